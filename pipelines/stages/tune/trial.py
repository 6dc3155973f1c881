"""One trial of the ``tune`` search: screen a sampled config by its estimated memory, then
train, score and measure it in-process.

:func:`run_trial` first estimates the peak memory of one training step at the sample's batch
size and resolution (:func:`gattn.budget.estimate_peak_memory`, fake tensors, about a
second); over the largest budget the config is recorded as ``infeasible`` and never trained.
Otherwise :func:`train_config` trains ``tune.epochs`` short epochs with the finetune stage's
recipe (AdamW, warm-up + cosine, class-balanced cross-entropy, random flips), reporting the
validation quality after each epoch (so ASHA can stop it), the measured peak memory of a
training step (:func:`gattn.budget.peak_memory`), images/s and parameters. In a sweep each
report carries a checkpoint of the model's weights (:data:`WEIGHTS`, safetensors; Tune keeps
the latest), so the finetune stage can start where the trial ended. A trial that
raises (a bad block option, out of memory) is recorded as ``error``/``oom``: a trial's fault
never stops the sweep.

Why in-process and not a ``TorchTrainer`` per trial: Ray 2.60 refuses ``Tuner(TorchTrainer)``,
and a trial here is seconds of single-process training, so a worker group per trial would add
its start-up to every trial for no gain.
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from gattn.budget import estimate_peak_memory, peak_memory, train_step
from gattn.data import DetTarget
from gattn.inference.preprocess import resize_input
from gattn.models import build_model
from gattn.models.io import cpu_state_dict
from pipelines.config import Task, TuneParams
from pipelines.data import HeldSplit, SkipCounted, stream
from pipelines.init_weights import InitWeights, apply_init
from pipelines.metrics import METRIC, score_resized
from pipelines.stages.tune.space import model_config, summary, trial_id
from pipelines.train.loop import warmup_cosine_scheduler

GIB = 2**30
WEIGHTS = "weights.safetensors"  # in a trial's checkpoint: the model after its last epoch

Report = Callable[[dict[str, Any]], None]
"""Receives a trial's metrics (after each epoch, or once for a trial that never trains)."""
ReportModel = Callable[[dict[str, Any], nn.Module], None]
"""Receives an epoch's metrics with the model as that epoch left it."""


Targets = torch.Tensor | list[DetTarget]
"""A batch's targets: labels, masks, or (detection) a ``{"boxes", "labels"}`` dict per image."""


def _resize_targets(y: Targets, size: int, source: int) -> Targets:
    """Targets of images resized from ``source`` to ``size`` px (masks nearest, boxes scaled)."""
    if isinstance(y, list):
        return [{"boxes": t["boxes"] * (size / source), "labels": t["labels"]} for t in y]
    if y.ndim == 1 or y.shape[-1] == size:
        return y
    return F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def _to(y: Targets, device: torch.device) -> Targets:
    if isinstance(y, list):
        return [{k: v.to(device) for k, v in t.items()} for t in y]
    return y.to(device)


def _tensors(y: Targets) -> list[torch.Tensor]:
    return [v for t in y for v in t.values()] if isinstance(y, list) else [y]


def _at_size(
    images: torch.Tensor, targets: Targets, size: int, device: torch.device
) -> tuple[torch.Tensor, Targets]:
    """A streamed batch resized to ``size`` px, on ``device``."""
    x = resize_input(images, (size, size)).to(device)
    return x, _to(_resize_targets(targets, size, images.shape[-1]), device)


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[list[int]]:
    order = torch.randperm(n, generator=gen).tolist()
    full = max(1, n // batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]


def _flip(x: torch.Tensor, y: Targets, gen: torch.Generator) -> tuple[torch.Tensor, Targets]:
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
        y = _mirrored(y, x.shape[-1]) if isinstance(y, list) else y.flip(-1) if y.ndim > 1 else y
    return x, y


def _mirrored(y: list[DetTarget], width: int) -> list[DetTarget]:
    """Detection targets of horizontally flipped images ``width`` px wide."""
    sign, shift = torch.tensor([-1.0, 1, -1, 1]), torch.tensor([width, 0.0, width, 0])
    return [{**t, "boxes": t["boxes"][:, [2, 1, 0, 3]] * sign + shift} for t in y]


def measured_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: Targets,
    weight: torch.Tensor | None,
) -> int:
    """One training step under :func:`gattn.budget.peak_memory` (batch, model and optimizer
    state counted); returns its peak bytes."""
    return peak_memory(
        lambda: train_step(model, optimizer, x, y, weight),
        [model, optimizer, x, *_tensors(y)],
        x.device,
    )


def _counting(
    batches: Iterable[tuple[torch.Tensor, Targets, torch.Tensor]], row: dict[str, Any]
) -> Iterator[tuple[torch.Tensor, Targets, torch.Tensor]]:
    """``batches`` (of :func:`pipelines.data.stream`) as they come, adding their skipped
    samples to ``row["skipped"]``."""
    for batch in batches:
        row["skipped"] += int(batch[2].sum())
        yield batch


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SkipCounted,
    batch_size: int,
    size: int,
    gen: torch.Generator,
    measure: bool,
    weight: torch.Tensor | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    workers: int = 0,
) -> dict[str, float]:
    """One epoch of random-flip training at ``size`` px over ``data`` in a random order
    (read as a stream by ``workers`` loader processes; loss weighted per class by ``weight``,
    if given; ``scheduler`` stepped after every optimizer step). A detector's boxes are
    flipped and scaled with its images, and its loss is its own
    (:meth:`gattn.models.Detector.loss`, via :func:`gattn.budget.train_step`).

    With ``measure``, the second step (the first has created the optimizer state) is run
    under :func:`gattn.budget.peak_memory` and left out of the timing.

    Returns:
        ``steps``, ``images``, ``seconds`` (timed steps), ``loss`` (mean), ``peak_bytes``
        (0 when not measured) and ``skipped`` (unreadable samples replaced).
    """
    device = next(model.parameters()).device
    out = {"steps": 0.0, "images": 0.0, "seconds": 0.0, "loss": 0.0, "peak_bytes": 0.0}
    out["skipped"] = 0.0
    batches = stream(data, batches=_batches(len(data), batch_size, gen), workers=workers)
    for images, targets, _ in _counting(batches, out):
        x, y = _at_size(*_flip(images, targets, gen), size, device)
        if measure and out["steps"] == 1:
            out["peak_bytes"] = float(measured_step(model, optimizer, x, y, weight))
        else:
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, x, y, weight)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["seconds"] += time.perf_counter() - t0
            out["images"] += len(x)
            out["loss"] += float(loss)
        if scheduler is not None:
            scheduler.step()
        out["steps"] += 1
    out["loss"] /= max(1.0, out["steps"] - (1 if measure else 0))
    return out


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(err)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares, loaded once by the stage
    (:func:`pipelines.stages.tune.stage.data_context`) and handed to each trial through
    ``tune.with_parameters`` (so it is pickled: plain values and CPU tensors only).

    Attributes:
        params: The ``tune`` section.
        seed: The global seed (initialisation and data order of every trial).
        kind: The task's targets: ``seg`` (masks), ``cls`` (labels) or ``det`` (boxes).
        num_classes: Classes of the prepared data.
        in_chans: Image channels.
        train: The training images, at the size the data are held at
            (:class:`pipelines.data.HeldSplit`): each trial reads its own batches from the
            files and resizes them to its resolution.
        val: The validation images, the same way.
        class_weight: The loss weight of each class (``tune.balance_classes``; None: none,
            and always for a detector, whose focal loss takes none), counted once over the
            training split.
        inits: Each family's initial weights (``tune.families.<name>.init``, resolved once
            by :func:`pipelines.init_weights.resolve_init`); a family without an entry starts
            from scratch.
        device: ``cuda`` or ``cpu``.
        threads: Torch threads of a trial (its CPUs).
    """

    params: TuneParams
    seed: int
    kind: Task
    num_classes: int
    in_chans: int
    train: HeldSplit
    val: HeldSplit
    class_weight: torch.Tensor | None
    inits: dict[str, InitWeights]
    device: str
    threads: int


def run_trial(
    sample: Mapping[str, Any],
    context: TrialContext,
    report: Report,
    report_model: ReportModel | None = None,
) -> dict[str, Any]:
    """Screen, train and measure one sampled config; report after every epoch.

    Never raises for the config's own faults: a config over the largest budget reports
    ``status: infeasible`` (quality 0, nothing trained), one that raises reports ``error`` or
    ``oom`` (quality 0) with the message.

    Args:
        sample: One point of :func:`search_space`.
        context: What the sweep's trials share.
        report: Receives each epoch's metrics (``ray.tune.report`` in a sweep).
        report_model: If given, receives each epoch's metrics with the model instead of
            ``report`` (a sweep's :func:`trainable` checkpoints the weights with them).

    Returns:
        The last report.
    """
    p = context.params
    device = torch.device(context.device)
    budgets = sorted(p.budgets_gib)
    row: dict[str, Any] = {
        "trial": trial_id(sample),
        "summary": summary(sample),
        "status": "running",
        "quality": 0.0,
        "metric": METRIC[context.kind],
        "epochs": 0,
        "steps": 0,
        "error": "",
    }
    try:
        cfg = model_config(sample, p, context.kind, context.num_classes, context.in_chans)
        row["model"] = cfg
        estimated = estimate_peak_memory(
            cfg, int(sample["batch_size"]), int(sample["img_size"]), device, lr=sample["lr"]
        )
        row["estimated_memory_gib"] = estimated / GIB
        row["fits_budgets_gib"] = [b for b in budgets if estimated <= b * GIB]
        if not row["fits_budgets_gib"]:
            row["status"] = "infeasible"
            report(dict(row))
            return row
        train_config(sample, context, p, cfg, device, row, report, report_model)
    except Exception as err:  # a trial's fault must not stop the sweep
        row["status"] = "oom" if _is_oom(err) else "error"
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
        row["traceback"] = traceback.format_exc()[-4000:]
        report(dict(row))
    return row


def build_trial_model(
    cfg: dict[str, Any],
    context: TrialContext,
    device: torch.device,
    row: dict[str, Any],
    family: str = "",
) -> nn.Module:
    """The model of ``cfg`` (after ``torch.manual_seed(context.seed)``), with its ``family``'s
    initial weights (``context.inits``) loaded where names and shapes match, in train mode on
    ``device``; ``row`` gains ``pretrained_tensors`` (how many were loaded) and ``params``."""
    torch.manual_seed(context.seed)
    model = build_model(cfg)
    row["pretrained_tensors"] = 0
    if family in context.inits:
        row["pretrained_tensors"] = len(apply_init(model, cfg, context.inits[family]).matched)
    model = model.to(device).train()
    row["params"] = sum(q.numel() for q in model.parameters())
    return model


def first_batch_peak(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: SkipCounted,
    batch_size: int,
    size: int,
    weight: torch.Tensor | None,
) -> float:
    """:func:`measured_step` on the first batch at ``size`` px: the peak of a trial whose epoch
    is one step (:func:`train_epoch` measures its second step, taken with optimizer state)."""
    device = next(model.parameters()).device
    images, targets, _ = next(iter(stream(data, batch_size)))
    x, y = _at_size(images, targets, size, device)
    return float(measured_step(model, optimizer, x, y, weight))


def train_config(
    sample: Mapping[str, Any],
    context: TrialContext,
    p: TuneParams,
    cfg: dict[str, Any],
    device: torch.device,
    row: dict[str, Any],
    report: Report,
    report_model: ReportModel | None = None,
) -> nn.Module:
    """Train ``cfg`` as a trial does and return the model; ``row`` gains the figures, which
    ``report`` receives after every epoch (``report_model``, if given, receives them with the
    model instead).

    The recipe is the finetune stage's, over ``p.epochs``: AdamW at the sample's peak
    learning rate with the shared warm-up + cosine schedule
    (:func:`pipelines.train.loop.warmup_cosine_scheduler`: ``p.warmup_epochs`` of linear
    warm-up, cosine down to ``lr * p.min_lr_ratio``), class-balanced cross-entropy, random
    flips; the data order and initialisation follow ``context.seed``. The trial reads its
    batches from the files (``tune.loader_workers`` processes); ``row["skipped"]`` counts the
    unreadable samples it met (each replaced by the next good one), which never stop it.
    """
    gen = torch.Generator().manual_seed(context.seed)
    model = build_trial_model(cfg, context, device, row, str(sample.get("family", "")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=sample["lr"], weight_decay=p.weight_decay)
    size, batch_size = int(sample["img_size"]), int(sample["batch_size"])
    train, val, workers = context.train.open(), context.val.open(), p.loader_workers
    # Counting the steps draws one permutation from ``gen``: the data order depends on it.
    steps = len(_batches(len(train), batch_size, gen))
    scheduler = warmup_cosine_scheduler(
        optimizer, p.epochs * steps, p.warmup_epochs * steps, p.min_lr_ratio
    )
    weight = None if context.class_weight is None else context.class_weight.to(device)
    images = seconds = 0.0
    row["skipped"] = 0
    for epoch in range(p.epochs):
        stats = train_epoch(
            model, optimizer, train, batch_size, size, gen, epoch == 0, weight, scheduler, workers
        )
        if epoch == 0:
            if stats["steps"] < 2:  # one step per epoch: measure a second one now
                stats["peak_bytes"] = first_batch_peak(
                    model, optimizer, train, batch_size, size, weight
                )
            row["peak_memory_gib"] = stats["peak_bytes"] / GIB
        images += stats["images"]
        seconds += stats["seconds"]
        val_batches = _counting(stream(val, workers=workers), row)
        scores = score_resized(model, val_batches, context.kind, size, context.num_classes)
        row["skipped"] += int(stats["skipped"])
        row.update(
            status="ok",
            epochs=epoch + 1,
            steps=row["steps"] + int(stats["steps"]),
            loss=stats["loss"],
            images_per_s=images / max(seconds, 1e-9),
            train_s=seconds,
            quality=scores[METRIC[context.kind]],
        )
        if report_model is not None:
            report_model(dict(row), model)
        else:
            report(dict(row))
    return model


def trainable(sample: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: :func:`run_trial` with ``ray.tune.report``."""
    from ray import tune

    torch.set_num_threads(max(1, int(context.threads)))
    run_trial(
        sample, context, lambda metrics: tune.report(_tune_metrics(metrics)), report_with_weights
    )


def report_with_weights(metrics: dict[str, Any], model: nn.Module) -> None:
    """``ray.tune.report`` of an epoch's metrics with a checkpoint holding the model's weights
    (:data:`WEIGHTS`); Tune persists the folder before this returns."""
    from ray import tune

    with tempfile.TemporaryDirectory() as tmp:
        save_file(cpu_state_dict(model), str(Path(tmp) / WEIGHTS))
        tune.report(_tune_metrics(metrics), checkpoint=tune.Checkpoint.from_directory(tmp))


def _tune_metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    """Tune results hold flat values: nested entries are carried as JSON strings."""
    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}
