"""The Ray Train run every training stage shares, and the helpers its workers call.

:func:`fit_torch_trainer` runs a ``TorchTrainer`` the one way the pretrain and finetune stages
do (DDP, resources, failures, checkpoints kept, the run folder named so a rerun resumes);
inside it, each worker runs :func:`pipelines.train.loop.train` with :func:`worker_loader`,
:func:`begin_epoch`, :func:`mean_over_workers` and :func:`checkpoint_dir`.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipelines.data import Sample, Split

Collate = Callable[[list[Sample]], Any]  # how a loader batches samples


def worker_loader(
    dataset: Split, batch_size: int, world: int, collate_fn: Collate | None = None
) -> tuple[DataLoader[Sample], int]:
    """A shuffling loader over ``dataset`` for one of ``world`` workers (before
    ``prepare_data_loader`` shards it) and the steps one epoch takes per worker. The last
    partial batch is dropped only when every worker still gets a full one; ``collate_fn``
    batches the samples (None: torch's default; detection: :func:`gattn.data.collate_detection`).
    """
    drop_last = len(dataset) >= batch_size * world
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, collate_fn=collate_fn
    )
    n = len(dataset)
    steps = n // world // batch_size if drop_last else math.ceil(n / world / batch_size)
    return loader, steps


def begin_epoch(config: dict[str, Any], epoch: int, rank: int, loader: DataLoader[Sample]) -> None:
    """Start ``epoch`` (0-based) of a train loop: reshuffle the distributed sampler, after the
    fault injection of the tests (``config["fail_at_epoch"]``, 1-based: the rank-0 worker
    raises once there, leaving ``config["fail_flag"]`` so the resumed run goes on)."""
    if config.get("fail_at_epoch") == epoch + 1 and rank == 0:
        flag = Path(config["fail_flag"])
        if not flag.exists():
            flag.write_text(f"failed once at epoch {epoch + 1}\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch + 1}")
    set_epoch = getattr(loader.sampler, "set_epoch", None)  # a DistributedSampler's
    if set_epoch is not None:
        set_epoch(epoch)


def mean_over_workers(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean of ``values`` over all DDP workers, reduced on ``device`` (NCCL needs the
    GPU) and returned on the CPU; ``values`` itself outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        reduced = values.to(device)
        dist.all_reduce(reduced)
        return reduced.cpu() / dist.get_world_size()
    return values


@contextlib.contextmanager
def checkpoint_dir(config: dict[str, Any], epoch: int) -> Iterator[Path]:
    """A folder to write one epoch's checkpoint into before ``ray.train.report``.

    Ray Train workers report a temporary folder, which Ray copies to the run's storage. Ray
    Train's local mode (``num_workers: 0``: the loop runs in the driver, without worker
    actors) keeps the reported folder where it is, so there it is a lasting folder under the
    run's storage (``config["local_checkpoints"]``).
    """
    if config.get("local_checkpoints"):
        path = Path(config["local_checkpoints"]) / f"epoch_{epoch:04d}"
        path.mkdir(parents=True, exist_ok=True)
        yield path
    else:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)


def fit_torch_trainer(
    train_loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    p: Any,
    name: str,
    storage: Path,
) -> tuple[Any, float]:
    """Run a Ray Train V2 ``TorchTrainer`` the way every training stage does.

    DDP over ``p.num_workers`` workers (NCCL on GPU, gloo on CPU; ``0``: Ray Train's local
    mode, the loop in this process with ``p.cpus_per_worker`` threads), ``p.cpus_per_worker`` CPUs
    each, ``p.max_failures`` worker failures survived from the last checkpoint, the two
    newest checkpoints kept, under ``storage/name`` (so a rerun of the same name resumes).
    Runs inside :func:`local_ray`.

    Args:
        train_loop: The per-worker loop.
        loop_config: Its config.
        p: A stage section with ``num_workers``, ``cpus_per_worker``, ``use_gpu`` and
            ``max_failures``.
        name: The run name.
        storage: The run folders' root.

    Returns:
        ``(result, wall seconds)``.

    Raises:
        RuntimeError: the run produced no checkpoint.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if p.num_workers == 0:  # local mode: checkpoints stay where the loop writes them
        loop_config = {**loop_config, "local_checkpoints": str(storage / name / "local")}
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=p.num_workers,
            use_gpu=p.use_gpu,
            resources_per_worker={"CPU": p.cpus_per_worker} if p.num_workers else None,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=p.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    from pipelines.ray_session import local_ray

    ray_up = local_ray(p.num_workers * p.cpus_per_worker, p.use_gpu)
    with ray_up if p.num_workers else contextlib.nullcontext():  # local mode needs no Ray
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} produced no checkpoint: {result.error}")
    return result, wall
