"""``tune`` stage: search global-context modules under memory budgets with Ray Tune.

The source article picks a global strategy from the memory at hand by a fixed rule. This stage
measures instead: Ray Tune samples configs (backbone family; which registry block, after which
stage, how large, how many, fused or plain attention; decode head; batch size, resolution,
learning rate) with Optuna's TPE sampler (Bergstra et al. 2011, "Algorithms for
Hyper-Parameter Optimization") and stops weak trials early with ASHA (Li et al. 2020, "A
System for Massively Parallel Hyperparameter Tuning").

Each trial (:func:`run_trial`):

1. estimates the peak memory of one training step at its batch size and resolution
   (:func:`gattn.budget.estimate_peak_memory`, fake tensors, about a second); over the largest
   budget it is recorded as ``infeasible`` and never trained;
2. otherwise trains ``tune.epochs`` short epochs on the prepared benchmark, from the pretrained
   encoder where the backbone matches (tensors matched by name and shape, the rest left
   initialised), reporting after each epoch the validation quality (mIoU or accuracy,
   torchmetrics), so ASHA can stop it;
3. reports the measured peak memory of a training step (CUDA allocator or tracked CPU
   tensors, :func:`gattn.budget.peak_memory`), training images/s and parameters.

A trial that raises (a bad block option, out of memory) is recorded as ``error``/``oom`` and
the sweep goes on; a trial whose process dies is collected from Tune's results as ``error``.

Why a function trainable with an in-process loop: Ray 2.60 refuses ``Tuner(TorchTrainer)``,
and a trial here is seconds of single-process training, so nesting a ``TorchTrainer`` per
trial would add a worker group (and its startup) to every trial for no gain. Each trial
reserves ``cpus_per_trial`` CPUs (and ``gpus_per_trial`` GPUs), which are also its torch
threads; ``max_concurrent`` trials run at once. On a cluster the same trainable runs one trial
per reserved slot; raise ``cpus_per_trial``/``gpus_per_trial`` for larger trials.

Outputs (``models/tune`` and ``reports/tune``):

- ``models/tune/best.json``: the best config per budget (by quality, among trained configs
  whose measured peak fits) and ``selected_budget``, read by the finetune stage;
- ``reports/tune/trials.csv``: every trial; ``pareto.csv``/``pareto.json``: the configs no
  other beats on quality, memory and speed at once; ``pareto.png``; ``metrics.json``.

Every trial is logged as an MLflow child run of the stage's run (from the driver, after the
sweep, so a crashed trial is logged too).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gattn import modules as registry
from gattn.budget import estimate_peak_memory, peak_memory, train_step
from gattn.budget.recommend import best_fitting
from gattn.inference.preprocess import resize_input
from gattn.models import build_model, model_stages
from gattn.models.pretrained import load_pretrained, read_encoder
from gattn.ssl.schedules import warmup_cosine
from pipelines.config import ParamsError, TuneParams, add_params_arguments, load_params
from pipelines.data import load_tensors, native_size
from pipelines.io import publish_dir, staging_dir, write_csv, write_json
from pipelines.metrics import METRIC, class_weights, score_resized
from pipelines.prepare import PREPARED

MODELS = Path("models/tune")
REPORTS = Path("reports/tune")
PRETRAINED = Path("models/pretrained")
GIB = 2**30
ATTENTION_BLOCKS = ("global_attn", "global_tokens", "window_attn", "shifted_window_attn")
TRIAL_COLUMNS = [
    "trial",
    "status",
    "family",
    "module",
    "module_size",
    "attn_impl",
    "position",
    "num_blocks",
    "head",
    "batch_size",
    "img_size",
    "lr",
    "estimated_memory_gib",
    "peak_memory_gib",
    "fits_budgets_gib",
    "quality",
    "metric",
    "epochs",
    "steps",
    "images_per_s",
    "params",
    "pretrained_tensors",
    "train_s",
    "error",
]
PARETO_COLUMNS = [
    "trial",
    "quality",
    "metric",
    "peak_memory_gib",
    "images_per_s",
    "params",
    "summary",
]


# ---------------------------------------------------------------------------------------------
# The search space and what a sample means.


def check_params(p: TuneParams) -> None:
    """Check the names ``tune`` refers to (blocks, heads) against the registries.

    Raises:
        ParamsError: naming the key and the valid values.
    """
    from gattn.models import HEADS

    blocks = set(registry.available())
    bad = [m for m in p.modules if m != "none" and m not in blocks]
    if bad:
        raise ParamsError(f"tune.modules: unknown block(s) {bad}; valid: none, {sorted(blocks)}")
    for size, table in p.module_sizes.items():
        unknown = sorted(set(table) - blocks)
        if unknown:
            raise ParamsError(f"tune.module_sizes.{size}: unknown block(s) {unknown}")
    bad = [h for h in p.heads if h not in HEADS]
    if bad:
        raise ParamsError(f"tune.heads: unknown head(s) {bad}; valid: {sorted(HEADS)}")


def search_space(p: TuneParams, task: str) -> dict[str, Any]:
    """The Tune search space of ``p`` for a task kind (:meth:`TuneParams.choices`: categorical
    knobs, ``head`` for segmentation only) and a log-uniform learning rate."""
    from ray import tune

    choices = p.choices(task)
    heads = choices.pop("head", None)
    space: dict[str, Any] = {k: tune.choice(v) for k, v in choices.items()}
    space["lr"] = tune.loguniform(*p.lr)
    if heads is not None:
        space["head"] = tune.choice(heads)
    return space


def model_config(
    sample: Mapping[str, Any], p: TuneParams, task: str, num_classes: int, in_chans: int
) -> dict[str, Any]:
    """The :func:`gattn.models.build_model` config a sample describes.

    ``position`` ``last`` injects after the backbone's last stage, ``second_last`` after the
    one before (the first stage when there is only one); ``num_blocks`` copies of the block.
    """
    family = p.families[sample["family"]]
    cfg: dict[str, Any] = {
        "task": task,
        "backbone": family.backbone,
        "backbone_kwargs": dict(family.backbone_kwargs),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "img_size": int(sample["img_size"]),
    }
    if task == "seg":
        cfg.update(head=sample.get("head", p.heads[0]), head_channels=p.head_channels)
    module = sample["module"]
    if module != "none":
        probe = build_model({**cfg, "num_classes": max(1, num_classes)})
        stages = len(model_stages(probe.encoder if task == "seg" else probe))
        stage = stages if sample["position"] == "last" else max(1, stages - 1)
        options = dict(p.module_sizes[sample["module_size"]].get(module, {}))
        if module in ATTENTION_BLOCKS:
            options["fused_attn"] = sample["attn_impl"] == "fused"
        cfg["inject"] = [{"block": module, "stage": stage, **options}] * int(sample["num_blocks"])
    return cfg


def summary(sample: Mapping[str, Any]) -> str:
    """A one-line description of a sample, e.g. ``vit +global_attn(large,plain)x2@last``."""
    text = sample["family"]
    if sample["module"] != "none":
        impl = f",{sample['attn_impl']}" if sample["module"] in ATTENTION_BLOCKS else ""
        text += (
            f" +{sample['module']}({sample['module_size']}{impl})x{sample['num_blocks']}"
            f"@{sample['position']}"
        )
    if "head" in sample:
        text += f" {sample['head']} head"
    return f"{text}, batch {sample['batch_size']} @ {sample['img_size']}px"


def trial_id(sample: Mapping[str, Any]) -> str:
    """A stable id of a sample (the same config gets the same id)."""
    blob = json.dumps(dict(sample), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


# ---------------------------------------------------------------------------------------------
# Data and pretrained weights.


# ---------------------------------------------------------------------------------------------
# One trial.


def _resize_targets(y: torch.Tensor, size: int) -> torch.Tensor:
    if y.ndim == 1 or y.shape[-1] == size:
        return y
    return F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    full = max(1, n // batch_size)
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(full)]


def _flip(
    x: torch.Tensor, y: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(-1)
        y = y.flip(-1) if y.ndim > 1 else y
    return x, y


def measured_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None,
) -> int:
    """One training step under :func:`gattn.budget.peak_memory` (batch, model and optimizer
    state counted); returns its peak bytes."""
    return peak_memory(
        lambda: train_step(model, optimizer, x, y, weight), [model, optimizer, x, y], x.device
    )


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[torch.Tensor, torch.Tensor],
    batch_size: int,
    size: int,
    gen: torch.Generator,
    measure: bool,
    weight: torch.Tensor | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """One epoch of random-flip training at ``size`` px (loss weighted per class by
    ``weight``, if given; ``scheduler`` stepped after every optimizer step).

    With ``measure``, the second step (the first has created the optimizer state) is run
    under :func:`gattn.budget.peak_memory` and left out of the timing.

    Returns:
        ``steps``, ``images``, ``seconds`` (timed steps), ``loss`` (mean) and ``peak_bytes``
        (0 when not measured).
    """
    images, targets = data
    device = next(model.parameters()).device
    out = {"steps": 0.0, "images": 0.0, "seconds": 0.0, "loss": 0.0, "peak_bytes": 0.0}
    for idx in _batches(len(images), batch_size, gen):
        x, y = _flip(images[idx], targets[idx], gen)
        x, y = resize_input(x, (size, size)).to(device), _resize_targets(y, size).to(device)
        if measure and out["steps"] == 1:
            out["peak_bytes"] = float(measured_step(model, optimizer, x, y, weight))
        else:
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, x, y, weight)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out["seconds"] += time.perf_counter() - t0
            out["images"] += len(idx)
            out["loss"] += float(loss)
        if scheduler is not None:
            scheduler.step()
        out["steps"] += 1
    out["loss"] /= max(1.0, out["steps"] - (1 if measure else 0))
    return out


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError | MemoryError) or "out of memory" in str(err)


def run_trial(
    sample: Mapping[str, Any],
    context: Mapping[str, Any],
    report: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Screen, train and measure one sampled config; report after every epoch.

    Never raises for the config's own faults: a config over the largest budget reports
    ``status: infeasible`` (quality 0, nothing trained), one that raises reports ``error`` or
    ``oom`` (quality 0) with the message.

    Args:
        sample: One point of :func:`search_space`.
        context: ``params`` (the ``tune`` section as a dict), ``seed``, ``kind``,
            ``num_classes``, ``in_chans``, ``train``/``val`` (tensors from
            :func:`load_tensors`), ``pretrained`` (``(config, weights)`` from
            :func:`gattn.models.pretrained.read_encoder`, or None) and
            ``device``.
        report: Receives each epoch's metrics (``ray.tune.report`` in a sweep).

    Returns:
        The last report.
    """
    p = TuneParams.model_validate(context["params"])
    device = torch.device(context["device"])
    budgets = sorted(p.budgets_gib)
    row: dict[str, Any] = {
        "trial": trial_id(sample),
        "summary": summary(sample),
        "status": "running",
        "quality": 0.0,
        "metric": "miou" if context["kind"] == "seg" else "accuracy",
        "epochs": 0,
        "steps": 0,
        "error": "",
    }
    try:
        cfg = model_config(sample, p, context["kind"], context["num_classes"], context["in_chans"])
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
        train_config(sample, context, p, cfg, device, row, report)
    except Exception as err:  # a trial's fault must not stop the sweep
        row["status"] = "oom" if _is_oom(err) else "error"
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
        row["traceback"] = traceback.format_exc()[-4000:]
        report(dict(row))
    return row


def train_config(
    sample: Mapping[str, Any],
    context: Mapping[str, Any],
    p: TuneParams,
    cfg: dict[str, Any],
    device: torch.device,
    row: dict[str, Any],
    report: Callable[[dict[str, Any]], None],
) -> nn.Module:
    """Train ``cfg`` as a trial does and return the model; ``row`` gains the figures, which
    ``report`` receives after every epoch.

    The recipe is the finetune stage's, over ``p.epochs``: AdamW at the sample's peak
    learning rate after ``p.warmup_epochs`` of linear warm-up, cosine down to
    ``lr * p.min_lr_ratio``, class-balanced cross-entropy, random flips; the data order and
    initialisation follow ``context["seed"]``.
    """
    torch.manual_seed(context["seed"])
    gen = torch.Generator().manual_seed(context["seed"])
    model = build_model(cfg)
    encoder = context.get("pretrained")
    if encoder is not None:
        source_cfg, weights = encoder
        init = load_pretrained(model, weights, source_cfg=source_cfg, target_cfg=cfg)
        row["pretrained_tensors"] = len(init.matched)
    else:
        row["pretrained_tensors"] = 0
    model = model.to(device).train()
    row["params"] = sum(q.numel() for q in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=sample["lr"], weight_decay=p.weight_decay)
    size, batch_size = int(sample["img_size"]), int(sample["batch_size"])
    steps = len(_batches(len(context["train"][0]), batch_size, gen))
    total, warmup = p.epochs * steps, p.warmup_epochs * steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, total, 1.0, p.min_lr_ratio, warmup)
    )
    weight = None
    if p.balance_classes:
        weight = class_weights(context["train"][1], context["num_classes"]).to(device)
    images = seconds = 0.0
    for epoch in range(p.epochs):
        stats = train_epoch(
            model, optimizer, context["train"], batch_size, size, gen, epoch == 0, weight, scheduler
        )
        if epoch == 0:
            if stats["steps"] < 2:  # one step per epoch: measure a second one now
                x, y = context["train"][0][:batch_size], context["train"][1][:batch_size]
                x, y = resize_input(x, (size, size)).to(device), _resize_targets(y, size).to(device)
                stats["peak_bytes"] = float(measured_step(model, optimizer, x, y, weight))
            row["peak_memory_gib"] = stats["peak_bytes"] / GIB
        images += stats["images"]
        seconds += stats["seconds"]
        row.update(
            status="ok",
            epochs=epoch + 1,
            steps=row["steps"] + int(stats["steps"]),
            loss=stats["loss"],
            images_per_s=images / max(seconds, 1e-9),
            train_s=seconds,
            quality=score_resized(
                model, *context["val"], context["kind"], size, context["num_classes"]
            )[METRIC[context["kind"]]],
        )
        report(dict(row))
    return model


def _trainable(sample: dict[str, Any], context: dict[str, Any]) -> None:
    """The Tune function trainable: :func:`run_trial` with ``ray.tune.report``."""
    from ray import tune

    torch.set_num_threads(max(1, int(context["threads"])))
    run_trial(sample, context, lambda metrics: tune.report(_tune_metrics(metrics)))


def _tune_metrics(row: Mapping[str, Any]) -> dict[str, Any]:
    """Tune results hold flat values: nested entries are carried as JSON strings."""
    return {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()}


# ---------------------------------------------------------------------------------------------
# The sweep and its outputs.


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows no other row beats on quality (max), peak memory (min) and images/s (max) at
    once, sorted by memory."""

    def dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        ge = (
            a["quality"] >= b["quality"]
            and a["peak_memory_gib"] <= b["peak_memory_gib"]
            and a["images_per_s"] >= b["images_per_s"]
        )
        gt = (
            a["quality"] > b["quality"]
            or a["peak_memory_gib"] < b["peak_memory_gib"]
            or a["images_per_s"] > b["images_per_s"]
        )
        return ge and gt

    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: (r["peak_memory_gib"], -r["quality"]))


def point(row: Mapping[str, Any]) -> dict[str, Any]:
    """A trained trial as a Pareto/best entry (the ``best.json`` contract)."""
    sample = row["config"]
    return {
        "trial": row["trial"],
        "summary": row["summary"],
        "model": row["model"],
        "train": {
            "lr": float(sample["lr"]),
            "batch_size": int(sample["batch_size"]),
            "img_size": int(sample["img_size"]),
            "weight_decay": row["weight_decay"],
            "epochs": int(row["epochs"]),
        },
        "quality": float(row["quality"]),
        "metric": row["metric"],
        "peak_memory_gib": float(row["peak_memory_gib"]),
        "estimated_memory_gib": float(row["estimated_memory_gib"]),
        "images_per_s": float(row["images_per_s"]),
        "params": int(row["params"]),
    }


def best_per_budget(
    points: Sequence[Mapping[str, Any]], budgets: Sequence[float]
) -> dict[str, Mapping[str, Any] | None]:
    """The best-quality trained config whose measured peak fits each budget (None if none)."""
    return {_key(b): best_fitting(points, b) for b in sorted(budgets)}


def _key(budget: float) -> str:
    return f"{budget:g}"


def pareto_figure(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    budgets: Sequence[float],
    path: Path,
) -> None:
    """Quality vs peak memory (log scale), colour = images/s; the front joined; infeasible
    configs at their estimate on the x axis; budgets as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from gattn.diagnostics import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        sc = ax.scatter(
            [r["peak_memory_gib"] for r in ok],
            [r["quality"] for r in ok],
            c=[r["images_per_s"] for r in ok],
            cmap="viridis",
            s=40,
            label="trained",
        )
        fig.colorbar(sc, ax=ax, label="training images/s")
    if front:
        ax.plot(
            [r["peak_memory_gib"] for r in front],
            [r["quality"] for r in front],
            "o--",
            mfc="none",
            color="tab:red",
            ms=11,
            label="Pareto front",
        )
    skipped = [r for r in rows if r["status"] == "infeasible"]
    if skipped:
        ax.scatter(
            [r["estimated_memory_gib"] for r in skipped],
            [0.0] * len(skipped),
            marker="x",
            color="grey",
            label="infeasible (estimate)",
        )
    for b in budgets:
        ax.axvline(b, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(sorted(budgets))  # the budgets (dotted lines) are the ticks
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    metric = rows[0]["metric"] if rows else "quality"
    ax.set(xlabel="peak training memory (GiB; dotted: budgets)", ylabel=f"validation {metric}")
    ax.set_title("tune: quality vs memory vs speed")
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)


def _row(result: Any) -> dict[str, Any]:
    """A trial row from a Tune ``Result`` (its last report, or its error)."""
    metrics = dict(result.metrics or {})
    sample = dict(result.config or {})
    row = {
        k: v
        for k, v in metrics.items()
        if k in (*TRIAL_COLUMNS, "summary", "model", "traceback", "loss")
    }
    for key in ("model", "fits_budgets_gib"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    row["config"] = sample
    row.setdefault("trial", trial_id(sample))
    row.setdefault("summary", summary(sample) if sample else "")
    if result.error is not None and row.get("status") in (None, "ok"):
        row["status"], row["error"] = "error", f"trial process failed: {result.error}"[:2000]
    row.setdefault("status", "stopped")  # never reported: ended by tune.time_budget_s
    history = getattr(result, "metrics_dataframe", None)
    row["history"] = (
        [
            {"epoch": int(e), "quality": float(q)}
            for e, q in zip(history["epochs"], history["quality"], strict=True)
            if e
        ]
        if history is not None and "epochs" in history and "quality" in history
        else []
    )
    return row


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    sample = row["config"]
    out = {k: sample.get(k, "") for k in TRIAL_COLUMNS if k in sample}
    out.update({k: row.get(k, "") for k in TRIAL_COLUMNS if k not in out})
    out["fits_budgets_gib"] = " ".join(f"{b:g}" for b in row.get("fits_budgets_gib") or [])
    return out


def data_context(
    prepared: Path, pretrained: Path | None, p: TuneParams, seed: int
) -> dict[str, Any]:
    """What every trial shares: data tensors (at the data's own size; each trial resizes to
    its resolution), classes, channels, the pretrained encoder and the device."""
    info = json.loads((Path(prepared) / "splits.json").read_text())
    size = native_size(prepared, max(p.img_sizes))  # your images: any sizes, held at the largest
    train_x, train_y, kind = load_tensors(prepared, "train", p.max_train_samples, size)
    val_x, val_y, _ = load_tensors(prepared, "val", p.max_val_samples, size)
    use_gpu = p.gpus_per_trial > 0 and torch.cuda.is_available()
    return {
        "params": p.model_dump(mode="json"),
        "seed": seed,
        "kind": kind,
        "num_classes": len(info["classes"]),
        "in_chans": int(train_x.shape[1]),
        "train": (train_x, train_y),
        "val": (val_x, val_y),
        "pretrained": read_encoder(pretrained) if (p.pretrained and pretrained) else None,
        "device": "cuda" if use_gpu else "cpu",
        "threads": p.cpus_per_trial,
    }


def is_point(config: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a trial's ``config`` is one of ``points`` (every key of the point equal)."""
    return any(all(config.get(k) == v for k, v in point.items()) for point in points)


def points_run_to_end(
    points: Sequence[Mapping[str, Any]], time_attr: str, max_t: int, **asha: Any
) -> Any:
    """An ASHA scheduler that never stops a fixed point before ``max_t``.

    The fixed points are the comparison the sweep must always hold (the local baseline and each
    global module at one setting). Judged at ASHA's first rung, a global module that finds the
    distant cue in its last epochs looks like the local baseline and was stopped (PPM: 0.19 mIoU
    after 2 epochs, 0.79 after 4). Their results still count in ASHA's rungs, so they set the
    bar for the sampled trials."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class PointsRunToEnd(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            early = result.get(time_attr, max_t) < max_t
            if action == TrialScheduler.STOP and early and is_point(trial.config, points):
                return TrialScheduler.CONTINUE
            return action

    return PointsRunToEnd(time_attr=time_attr, max_t=max_t, **asha)


def sweep(
    p: TuneParams, context: Mapping[str, Any], name: str
) -> tuple[list[dict[str, Any]], float]:
    """Run the Ray Tune sweep; returns a row per trial and the wall time."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.ray_utils import local_ray

    metric = "quality"
    searcher = OptunaSearch(
        metric=metric,
        mode="max",
        seed=context["seed"],
        points_to_evaluate=p.points(context["kind"]) or None,  # less keys the task lacks
    )
    scheduler = points_run_to_end(
        p.points(context["kind"]),
        time_attr="training_iteration",
        max_t=p.epochs,
        grace_period=p.grace_period,
        reduction_factor=p.reduction_factor,
    )
    resources = {
        "cpu": p.cpus_per_trial,
        "gpu": p.gpus_per_trial if context["device"] == "cuda" else 0,
    }
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, context=dict(context)), resources),
        param_space=search_space(p, context["kind"]),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode="max",
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=p.num_samples,
            max_concurrent_trials=p.max_concurrent,
            time_budget_s=p.time_budget_s,
            reuse_actors=True,  # a trial process keeps torch, timm and the data loaded
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(Path(p.storage).resolve()),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=0,
        ),
    )
    with local_ray(p.max_concurrent * p.cpus_per_trial, resources["gpu"] > 0):
        t0 = time.perf_counter()
        grid = tuner.fit()
        wall = time.perf_counter() - t0
    return [_row(r) for r in grid], wall


def write_outputs(
    rows: Sequence[dict[str, Any]],
    p: TuneParams,
    kind: str,
    wall: float,
    out_dir: Path,
    reports_dir: Path,
    measured_on: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``best.json`` (atomically, as a folder) and the reports; return the metrics.

    ``measured_on`` (``split``, ``images``, ``size``, ``metric``) says which images every
    trial's ``quality`` was scored on, so that the finetune stage can score its model on the
    same ones (:func:`pipelines.metrics.score_resized`)."""
    budgets = sorted(p.budgets_gib)
    for row in rows:  # a trial that never reported (stopped, process lost) has no figures
        row["weight_decay"] = p.weight_decay
        row.setdefault("metric", METRIC[kind])
        row.setdefault("quality", 0.0)
    trained = [point(r) for r in rows if r["status"] == "ok"]
    front = pareto_front(trained)
    per_budget = best_per_budget(trained, budgets)
    chosen = [b for b in budgets if per_budget[_key(b)] is not None]
    selected = (
        p.select_budget if p.select_budget is not None else (chosen[-1] if chosen else budgets[-1])
    )
    work = staging_dir(out_dir)
    write_json(
        work / "best.json",
        {
            "task": kind,
            "measured_on": dict(measured_on or {}),
            "budgets_gib": budgets,
            "per_budget": per_budget,
            "selected_budget": _key(selected),
        },
    )
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_csv(reports_dir / "trials.csv", [_flat(r) for r in rows], TRIAL_COLUMNS)
    write_csv(
        reports_dir / "pareto.csv",
        [{k: f[k] for k in PARETO_COLUMNS} for f in front],
        PARETO_COLUMNS,
    )
    write_json(
        reports_dir / "pareto.json",
        {
            "task": kind,
            "metric": "miou" if kind == "seg" else "accuracy",
            "budgets_gib": budgets,
            "objectives": {"quality": "max", "peak_memory_gib": "min", "images_per_s": "max"},
            "points": front,
        },
    )
    pareto_figure(rows, front, budgets, reports_dir / "pareto.png")
    counts = {
        s: sum(r["status"] == s for r in rows)
        for s in ("ok", "infeasible", "error", "oom", "stopped")
    }
    errors = [
        abs(t["estimated_memory_gib"] - t["peak_memory_gib"]) / t["peak_memory_gib"]
        for t in trained
        if t["peak_memory_gib"] > 0
    ]
    metrics = {
        "num_trials": len(rows),
        **{f"num_{k}": v for k, v in counts.items()},
        "num_pareto": len(front),
        "best_quality": max((t["quality"] for t in trained), default=0.0),
        **{
            f"best_quality_{_key(b)}gib": (per_budget[_key(b)] or {}).get("quality", 0.0)
            for b in budgets
        },
        "estimate_max_rel_error": max(errors, default=0.0),
        "wall_s": wall,
    }
    write_json(reports_dir / "metrics.json", metrics)
    publish_dir(work, out_dir)
    return metrics


def tune_stage(
    p: TuneParams,
    seed: int = 0,
    prepared: Path = PREPARED,
    pretrained: Path | None = PRETRAINED,
    out_dir: Path = MODELS,
    reports_dir: Path = REPORTS,
) -> dict[str, Any]:
    """Run the stage; returns ``{"metrics", "rows", "name"}``.

    Args:
        p: The ``tune`` section.
        seed: The global seed (searcher, initialisation, data order).
        prepared: The prepare stage's output.
        pretrained: The pretrain stage's output (None or missing: train from scratch).
        out_dir: Where ``best.json`` goes.
        reports_dir: Where trials, the Pareto front, its plot and metrics go.
    """
    check_params(p)
    context = data_context(Path(prepared), pretrained, p, seed)
    name = f"tune-{time.strftime('%Y%m%d-%H%M%S')}-{trial_id(p.model_dump(mode='json'))}"
    rows, wall = sweep(p, context, name)
    measured_on = {
        "split": "val",
        "images": int(context["val"][0].shape[0]),
        "size": int(context["val"][0].shape[-1]),
        "metric": METRIC[context["kind"]],
    }
    metrics = write_outputs(
        rows, p, context["kind"], wall, Path(out_dir), Path(reports_dir), measured_on
    )
    if not metrics["num_ok"]:
        raise RuntimeError(
            f"tune: none of {len(rows)} trials finished an epoch (statuses in "
            f"{Path(reports_dir) / 'trials.csv'}); on a busy machine raise tune.time_budget_s "
            "or lower tune.max_concurrent"
        )
    return {"metrics": metrics, "rows": rows, "name": name}


def log_trials(rows: Sequence[Mapping[str, Any]], experiment_id: str, parent_id: str) -> None:
    """One MLflow child run per trial under ``parent_id``: sample, status, figures, curve."""
    import mlflow

    for row in rows:
        tags = {
            "mlflow.parentRunId": parent_id,
            "gattn.stage": "tune.trial",
            "gattn.status": row["status"],
        }
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=f"trial-{row['trial']}", nested=True, tags=tags
        ):
            mlflow.log_params({k: str(v)[:500] for k, v in row["config"].items()})
            mlflow.log_param("summary", row.get("summary", "")[:500])
            figures = {
                k: float(row[k])
                for k in (
                    "quality",
                    "estimated_memory_gib",
                    "peak_memory_gib",
                    "images_per_s",
                    "params",
                    "steps",
                    "train_s",
                )
                if isinstance(row.get(k), int | float)
            }
            mlflow.log_metrics(figures)
            for h in row.get("history", []):
                mlflow.log_metric("epoch_quality", h["quality"], step=h["epoch"])
            if row.get("error"):
                mlflow.set_tag("gattn.error", row["error"][:5000])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("--data", type=Path, default=PREPARED, help="prepared data folder")
    parser.add_argument(
        "--pretrained", type=Path, default=PRETRAINED, help="pretrained encoder folder"
    )
    parser.add_argument("--out", type=Path, default=MODELS, help="folder for best.json")
    parser.add_argument("--reports", type=Path, default=REPORTS, help="report folder to write")


def run(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import tracking

    params = load_params(args.params, args.overrides)
    with tracking.stage_run(
        "tune", params.model_dump(include={"seed", "tune"}), params.tracking.experiment
    ) as parent:
        out = tune_stage(
            params.tune, params.seed, args.data, args.pretrained, args.out, args.reports
        )
        mlflow.log_metrics({k: float(v) for k, v in out["metrics"].items()})
        mlflow.set_tag("gattn.ray_run", out["name"])
        mlflow.log_artifacts(str(args.reports), artifact_path="tune")
        mlflow.log_artifacts(str(args.out), artifact_path="best")
        log_trials(out["rows"], parent.info.experiment_id, parent.info.run_id)
    m = out["metrics"]
    print(
        f"tune: {m['num_trials']} trials ({m['num_ok']} trained, {m['num_infeasible']} infeasible, "
        f"{m['num_error'] + m['num_oom']} failed) in {m['wall_s']:.0f}s; best quality "
        f"{m['best_quality']:.4f}; see {args.reports / 'pareto.csv'} and {args.out / 'best.json'}"
    )
    return 0


if __name__ == "__main__":
    import sys

    from pipelines.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
