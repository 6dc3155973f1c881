"""The Ray Train worker loop the pretrain and finetune stages share, with hooks for what
differs.

Every epoch of either stage is the same skeleton: resume from the run's last checkpoint,
AdamW with a linear warm-up then cosine decay of each parameter group's learning rate
(scaled by the group's ``lr_scale``), bf16 autocast on CUDA only, gradient clipping, and at
the end of the epoch the cross-worker means of the step figures, then (on rank 0) a checkpoint
(weights as safetensors, optimizer and scheduler as a ``weights_only`` state, the stage's
history as JSON) reported to Ray Train. A stage subclasses :class:`Hooks` for the rest: what
it builds and trains on, its loss, what it does after a step and at the end of an epoch, and
what else it saves.

The order of every random draw (model initialisation, data order, the stage's own draws) is
the stages' own, so a stage trains the same weights to the bit in a Ray Train worker and in
Ray Train's local mode (``num_workers: 0``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from gattn.models.io import cpu_state_dict
from gattn.ssl.schedules import warmup_cosine
from pipelines.data import Split
from pipelines.train.trainer import (
    Collate,
    begin_epoch,
    checkpoint_dir,
    mean_over_workers,
    worker_loader,
)

WEIGHTS, STATE, HISTORY = "model.safetensors", "state.pt", "history.json"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, total: int, warmup: float, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine to ``min_ratio`` of the peak at step
    ``total``, for each parameter group scaled by its ``lr_scale`` (default 1). The one
    schedule of every training: this loop's, and each tune trial's."""

    def factor(scale: float) -> Callable[[int], float]:
        return lambda step: scale * warmup_cosine(step, total, 1.0, min_ratio, warmup)

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [factor(g.get("lr_scale", 1.0)) for g in optimizer.param_groups]
    )


class Hooks:
    """What a stage puts into the shared loop (:func:`train`). One instance per worker.

    The loop sets ``rank``, ``world``, ``device``, ``steps_per_epoch``, ``total_steps``,
    ``start_epoch`` and ``history`` (the stage's JSON history, restored on resume) before it
    calls the hooks that use them.

    Attributes:
        stage: The stage's name, which starts its per-epoch progress line.
        loss_name: The name of the mean loss in an epoch's row.
        stat_names: Further per-image figures :meth:`loss` returns, averaged per epoch.
        collate_fn: How the training loader batches samples, set by :meth:`build` where the
            default does not (detection targets of different box counts).
    """

    stage = "train"
    loss_name = "loss"
    stat_names: tuple[str, ...] = ()
    collate_fn: Collate | None = None  # how the training loader batches samples (None: torch's)

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.history: Any = None
        self.rank = self.world = self.steps_per_epoch = self.total_steps = self.start_epoch = 0
        self.device = torch.device("cpu")

    # -- set-up ---------------------------------------------------------------------------
    def build(self) -> tuple[nn.Module, Split, int]:
        """The model (seeded: the loop has called ``torch.manual_seed``), the training set
        and the per-worker batch size."""
        raise NotImplementedError

    def resume(self, folder: Path, state: dict[str, Any]) -> None:
        """Restore the stage's own parts of a checkpoint (the loop restores the weights,
        optimizer, scheduler and history)."""

    def ddp_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the DDP wrapper."""
        return {}

    def on_device(self) -> None:
        """Move what the stage holds besides the model to ``self.device``."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW parameter groups (each may carry an ``lr_scale``)."""
        raise NotImplementedError

    peak_lr: float  # AdamW's peak learning rate
    min_lr_ratio: float  # the final learning rate, as a fraction of the peak
    warmup_epochs: float
    epochs: int
    grad_clip: float | None

    # -- training -------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, batch: Any, epoch: int, i: int
    ) -> tuple[torch.Tensor, int, Sequence[torch.Tensor]]:
        """The loss of one batch (under autocast), its image count, and the values of
        :attr:`stat_names` for it."""
        raise NotImplementedError

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Between the backward pass and gradient clipping of step ``step`` (0-based): edit the
        gradients (e.g. drop some) or the optimizer's groups (e.g. a weight-decay schedule)."""

    def after_step(self, model: nn.Module, step: int, lr: float, figures: torch.Tensor) -> None:
        """After the optimizer step ``step`` (0-based, taken at learning rate ``lr``);
        ``figures`` are the batch's sums ``(loss, *stats) * images, images``."""

    def end_epoch(self, model: nn.Module, row: dict[str, Any]) -> None:
        """On rank 0, before the checkpoint: add to the epoch's ``row`` and record it in
        :attr:`history`."""
        raise NotImplementedError

    def save(self, model: nn.Module, folder: Path) -> dict[str, Any]:
        """On rank 0: write the stage's own files into the checkpoint ``folder``; returns its
        entries of the ``weights_only`` state."""
        return {}


def _figures(loss: torch.Tensor, count: int, stats: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(loss, *stats) * count, count`` in float64, the sums an epoch accumulates."""
    out = torch.zeros(len(stats) + 2, dtype=torch.float64)
    out[-1] = count
    if stats:
        out[1:-1] = torch.stack([s.float().cpu() for s in stats])
        out[1:-1] *= out[-1]
    out[0] = float(loss.detach()) * out[-1]
    return out


def means(sums: torch.Tensor, hooks: Hooks) -> dict[str, float]:
    """Per-image means of summed :func:`_figures`, named."""
    count = float(sums[-1]) or 1.0
    names = (hooks.loss_name, *hooks.stat_names)
    return {k: float(v) / count for k, v in zip(names, sums[:-1], strict=True)}


def _restore(model: nn.Module, hooks: Hooks) -> dict[str, Any] | None:
    """Load the run's last checkpoint, if any, into ``model`` and ``hooks``; its state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        model.load_state_dict(load_file(str(Path(d) / WEIGHTS)))
        state = torch.load(Path(d) / STATE, weights_only=True)
        hooks.history = json.loads((Path(d) / HISTORY).read_text())
        hooks.resume(Path(d), state)
    return state


def _checkpoint(
    model: nn.Module,
    hooks: Hooks,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    row: dict[str, Any],
) -> None:
    """End an epoch: rank 0 completes ``row`` and writes the checkpoint; every worker
    reports (Ray Train needs each worker's report)."""
    import ray.train
    from ray.train import Checkpoint

    with checkpoint_dir(hooks.config, epoch + 1) as tmp:
        ckpt = None
        if hooks.rank == 0:
            inner = unwrap(model)
            hooks.end_epoch(inner, row)
            (tmp / HISTORY).write_text(json.dumps(hooks.history))
            save_file(cpu_state_dict(inner), str(tmp / WEIGHTS))
            extra = hooks.save(inner, tmp)
            state = {"epoch": epoch + 1, "optimizer": optimizer.state_dict()}
            torch.save({**state, "scheduler": scheduler.state_dict(), **extra}, tmp / STATE)
            ckpt = Checkpoint.from_directory(tmp)
        ray.train.report({k: v for k, v in row.items() if k != "start_epoch"}, checkpoint=ckpt)


def train(hooks: Hooks, threads: int) -> None:
    """Run one Ray Train worker of a stage: build, resume, train the remaining epochs.

    Args:
        hooks: The stage's :class:`Hooks`, made from the loop config (``seed``,
            ``fail_at_epoch``, ``fail_flag``, ``local_checkpoints``).
        threads: Torch threads of this worker (its CPU share).
    """
    import ray.train
    import ray.train.torch

    torch.set_num_threads(max(1, threads))
    ctx = ray.train.get_context()
    hooks.rank, hooks.world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(hooks.config["seed"])
    model, dataset, batch_size = hooks.build()
    loader, hooks.steps_per_epoch = worker_loader(
        dataset, batch_size, hooks.world, hooks.collate_fn
    )
    hooks.total_steps = hooks.epochs * hooks.steps_per_epoch
    state = _restore(model, hooks)
    hooks.start_epoch = state["epoch"] if state else 0

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=hooks.ddp_kwargs())
    loader = ray.train.torch.prepare_data_loader(loader)
    hooks.device = ray.train.torch.get_device()
    hooks.on_device()
    optimizer = torch.optim.AdamW(hooks.param_groups(unwrap(model)), lr=hooks.peak_lr)
    warmup = hooks.warmup_epochs * hooks.steps_per_epoch
    scheduler = warmup_cosine_scheduler(optimizer, hooks.total_steps, warmup, hooks.min_lr_ratio)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    for epoch in range(hooks.start_epoch, hooks.epochs):
        begin_epoch(hooks.config, epoch, hooks.rank, loader)
        t0 = time.perf_counter()
        sums = run_epoch(model, hooks, loader, optimizer, scheduler, epoch)
        seconds = time.perf_counter() - t0
        images = float(sums[-1]) * hooks.world
        row = {
            "epoch": epoch + 1,
            "start_epoch": hooks.start_epoch,
            **means(mean_over_workers(sums, hooks.device), hooks),
            "images_per_s": images / max(seconds, 1e-9),
            "lr": max(scheduler.get_last_lr()),
        }
        _checkpoint(model, hooks, optimizer, scheduler, epoch, row)
        if hooks.rank == 0:
            print(progress_line(hooks.stage, row, hooks.epochs, seconds), flush=True)


def progress_line(stage: str, row: dict[str, Any], epochs: int, seconds: float) -> str:
    """``<stage>: epoch E/N in S s: name=value ...``: an epoch's figures (its row, completed by
    the stage's :meth:`Hooks.end_epoch`), one line per epoch for the person watching."""
    figures = " ".join(
        f"{k}={v:.4g}"
        for k, v in row.items()
        if k not in ("epoch", "start_epoch") and isinstance(v, int | float)
    )
    return f"{stage}: epoch {row['epoch']}/{epochs} in {seconds:.0f} s: {figures}"


def run_epoch(
    model: nn.Module, hooks: Hooks, loader: Any, optimizer: Any, scheduler: Any, epoch: int
) -> torch.Tensor:
    """One epoch of optimizer steps; the sums of the batches' :func:`_figures`."""
    model.train()
    sums = torch.zeros(len(hooks.stat_names) + 2, dtype=torch.float64)
    use_amp = hooks.device.type == "cuda"
    for i, batch in enumerate(loader):
        lr = scheduler.get_last_lr()[0]
        with torch.autocast(hooks.device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss, count, stats = hooks.loss(model, batch, epoch, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        step = epoch * hooks.steps_per_epoch + i
        hooks.before_step(model, optimizer, step)
        if hooks.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hooks.grad_clip)
        optimizer.step()
        scheduler.step()
        figures = _figures(loss, count, stats)
        hooks.after_step(model, step, lr, figures)
        sums += figures
    return sums
