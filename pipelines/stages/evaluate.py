"""``evaluate`` stage: the fine-tuned model on the test split and on large images.

Two test sets, each scored with and without test-time augmentation (multi-scale + flip,
probabilities averaged; Chen et al. 2018, DeepLabv3+ Sec. 4):

- ``test``: the test split at the training resolution (``img_size``; masks resized nearest),
  the model run whole;
- ``large``: the large generated images (``data.large``), where the cue is outside most
  windows. Modes: ``resize`` (the image shrunk to ``img_size``, the logits enlarged back: all
  context, little detail), ``whole`` (one pass at full size, for models that take any size),
  ``sliding`` (windows of ``img_size``, :func:`gattn.inference.sliding_window`) and
  ``sliding_global`` (the same with global-context feedback, for models with
  ``encode_context``: the Segmenter). Classifiers get ``resize`` only.

Images reach the model as the served model's do:
:meth:`pipelines.serve.predictor.InputSpec.transform` and the ``resize`` mode's
:func:`gattn.inference.resize_input` are the serving app's preprocessing (floats, the model's
``mean``/``std``, antialiased bilinear resizing).

Scores (torchmetrics): accuracy (of pixels for segmentation), mIoU, per-class IoU, the
confusion matrix; wall time per image (median, after a warm-up); and the
effective receptive field of the model (Luo et al. 2016): the shares of the input area
holding 20/50/99% of the centre output's gradient, this project's "how global" number.

Reads ``evaluate`` (and ``tracking``) from params.yaml, ``models/finetuned/`` (or
``evaluate.model``: a registry URI or a folder) and ``data/prepared/``. Writes
``reports/evaluate/``: ``metrics.json`` (``dvc metrics``), ``results.csv`` and
``per_class_iou.csv`` (``dvc plots``), ``confusion_test.png``, ``confusion_large.png``,
``erf.png``; all logged to MLflow.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from gattn.diagnostics import (
    confusion_matrix,
    effective_receptive_field,
    heatmap,
    save_figure,
)
from gattn.diagnostics.grad_cam import to_nchw
from gattn.inference import resize_input, sliding_window, tta
from gattn.inference.tta import resize as resize_output
from gattn.models import load_model
from gattn.models.io import CONFIG
from pipelines.config import EvaluateParams, ModelTask, add_params_arguments, load_params
from pipelines.contracts import MODEL_FIX, ModelMeta, check
from pipelines.data import Split, open_split, read_splits, require_supported, subset
from pipelines.io import write_csv, write_json
from pipelines.metrics import summarise, task_metrics
from pipelines.paths import EVALUATE_REPORTS, FINETUNED, PREPARED
from pipelines.serve.predictor import InputSpec, fixed_input_size

Runner = Callable[[torch.Tensor], torch.Tensor]


def runners(
    model: nn.Module, task: ModelTask, size: int, p: EvaluateParams, large: bool
) -> dict[str, Runner]:
    """Name -> ``images (B, C, H, W) -> logits`` of every inference mode that applies."""

    def shrunk(x: torch.Tensor) -> torch.Tensor:
        out = model(resize_input(x, (size, size)))
        return resize_output(out, (x.shape[-2], x.shape[-1])) if task == "seg" else out

    def windows(context: Literal["auto"] | None) -> Runner:
        overlap = round(p.overlap * size)
        return functools.partial(
            sliding_window,
            model,
            window=size,
            overlap=overlap,
            batch_size=p.window_batch_size,
            blend=p.blend,
            global_context=context,
        )

    if not large:
        return {"plain": model}
    modes: dict[str, Runner] = {"resize": shrunk}
    if task == "seg":
        if not fixed_input_size(model):
            modes["whole"] = model
        modes["sliding"] = windows(None)
        if callable(getattr(model, "encode_context", None)):
            modes["sliding_global"] = windows("auto")
    return modes


def with_tta(
    run: Runner, model: nn.Module, task: ModelTask, size: int, p: EvaluateParams
) -> Runner:
    """``run`` under multi-scale + flip TTA. A fixed-size model at the test resolution sees
    each scaled view through sliding windows of its size (segmentation; padded when smaller)
    or resized to its size (classification)."""
    if run is model and fixed_input_size(model):
        if task == "seg":
            run = functools.partial(
                sliding_window, model, window=size, overlap=round(p.overlap * size)
            )
        else:
            run = lambda x: model(resize_input(x, (size, size)))  # noqa: E731
    return functools.partial(tta, run, scales=p.tta_scales, flip=p.tta_flip, task=task)


@torch.no_grad()
def score_mode(
    run: Runner, dataset: Split, task: ModelTask, num_classes: int, batch_size: int
) -> dict[str, Any]:
    """Scores of ``run`` over ``dataset``, and its wall time per image.

    Images run ``batch_size`` at a time (1 for latency proper); after one untimed warm-up
    call on the first image, every call is timed and ``ms_per_image`` is the median of
    call time / images in the call.
    """
    metrics = task_metrics(task, num_classes)
    run(dataset[0][0][None])
    per_image = []
    for start in range(0, len(dataset), batch_size):
        chunk = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([x for x, _ in chunk])
        targets = torch.stack([torch.as_tensor(t) for _, t in chunk])
        t0 = time.perf_counter()
        logits = run(images)
        per_image.append((time.perf_counter() - t0) / len(chunk))
        metrics.update(logits.argmax(1), targets)
    return {**summarise(metrics.compute()), "ms_per_image": 1000 * statistics.median(per_image)}


@runtime_checkable
class _HasFeatures(Protocol):
    """A timm-style classifier: its last feature map (or tokens) before pooling."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...


def feature_map(model: nn.Module, task: ModelTask) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``(B, K, h, w)`` map for the ERF: a segmenter's logits, or a classifier's last
    feature map (tokens laid on their grid, NHWC permuted)."""
    if task == "seg":
        return model

    def features(x: torch.Tensor) -> torch.Tensor:
        if not isinstance(model, _HasFeatures):
            raise TypeError(f"{type(model).__name__} has no forward_features: no feature map")
        out = model.forward_features(x)
        if out.ndim == 3:
            prefix = int(getattr(model, "num_prefix_tokens", 0))
            return to_nchw(out, "tokens", (x.shape[-2], x.shape[-1]), prefix)
        fmt = getattr(model, "output_fmt", "NCHW")
        return out.permute(0, 3, 1, 2) if getattr(fmt, "value", fmt) == "NHWC" else out

    return features


def open_sets(spec: InputSpec, prepared: Path, max_samples: int | None) -> dict[str, Split]:
    """The scored sets, samples already model inputs (the serving app's preprocessing):
    ``test`` (its first ``max_samples``) at ``spec.img_size``, and ``large`` at full size
    when the prepared data has large images."""
    info = read_splits(prepared)
    test = open_split("test", prepared, spec.transform(resize=True))
    sets = {"test": subset(test, max_samples)}
    if info.get("large"):
        sets["large"] = open_split("test", prepared, spec.transform(resize=False), large=True)
    return sets


def evaluate(
    p: EvaluateParams,
    model_dir: Path | str | None = None,
    prepared: Path = PREPARED,
    reports_dir: Path = EVALUATE_REPORTS,
) -> dict[str, Any]:
    """Run the stage; returns ``{"metrics", "rows", "model"}`` (also written to ``reports_dir``).

    Args:
        p: The ``evaluate`` section.
        model_dir: A model folder or a ``models:/`` registry URI; default ``p.model``, else
            ``models/finetuned``.
        prepared: The prepare stage's output folder.
        reports_dir: Where metrics, tables and figures go.
    """
    from pipelines.registry import resolve_model

    require_supported(read_splits(prepared), "evaluate")
    torch.set_num_threads(p.num_threads)
    folder = resolve_model(model_dir or p.model or FINETUNED)
    model, cfg = load_model(folder)
    meta = check(ModelMeta, cfg, Path(folder) / CONFIG, MODEL_FIX)
    spec = InputSpec.of(model, cfg, str(folder))
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    sets = open_sets(spec, prepared, p.max_samples)
    results = score_all(model, meta, sets, p)
    images = [sets["test"][i][0] for i in range(min(p.erf_images, len(sets["test"])))]
    erf = effective_receptive_field(feature_map(model, meta.task), torch.stack(images))
    heatmap(erf.map.numpy(), reports_dir / "erf.png", title="effective receptive field", log=True)
    rows = write_tables(results, meta.classes, reports_dir)
    draw_confusions(results, list(sets), meta.classes, reports_dir)
    metrics: dict[str, Any] = {
        key.replace("/", "."): {m: r[m] for m in ("accuracy", "miou", "ms_per_image")}
        for key, r in results.items()
    }
    metrics["erf"] = {f"area_{round(t * 100)}": v for t, v in erf.area_ratios.items()}
    write_json(reports_dir / "metrics.json", metrics)
    details = {"model": str(folder), "task": meta.task, "classes": meta.classes}
    write_json(
        reports_dir / "details.json", {**details, "img_size": meta.img_size, "results": results}
    )
    return {"metrics": metrics, "rows": rows, "model": str(folder)}


def score_all(
    model: nn.Module, meta: ModelMeta, sets: dict[str, Split], p: EvaluateParams
) -> dict[str, dict[str, Any]]:
    """``{"<set>/<mode>[_tta]": scores}`` of every inference mode that applies to each set,
    with and without TTA (test images ``p.batch_size`` at a time, large images one by one)."""
    task, size, k = meta.task, meta.img_size, len(meta.classes)
    results: dict[str, dict[str, Any]] = {}
    for set_name, dataset in sets.items():
        for mode, run in runners(model, task, size, p, set_name == "large").items():
            for use_tta in (False, True):
                runner = with_tta(run, model, task, size, p) if use_tta else run
                key = f"{set_name}/{mode}{'_tta' if use_tta else ''}"
                batch = p.batch_size if set_name == "test" else 1
                results[key] = score_mode(runner, dataset, task, k, batch)
                print(
                    f"evaluate: {key}: miou={results[key]['miou']:.4f} "
                    f"accuracy={results[key]['accuracy']:.4f}",
                    flush=True,
                )
    return results


def write_tables(
    results: dict[str, dict[str, Any]], classes: list[str], reports_dir: Path
) -> list[dict[str, Any]]:
    """``results.csv`` (one row per set and mode, returned) and ``per_class_iou.csv``."""
    rows = [
        {
            "set_mode": key,
            "set": key.split("/")[0],
            "mode": key.split("/")[1],
            "accuracy": r["accuracy"],
            "miou": r["miou"],
            "ms_per_image": r["ms_per_image"],
        }
        for key, r in results.items()
    ]
    write_csv(reports_dir / "results.csv", rows, list(rows[0]))
    write_csv(
        reports_dir / "per_class_iou.csv",
        [
            {"label": f"{key} {name}", "set_mode": key, "class": name, "iou": iou}
            for key, r in results.items()
            for name, iou in zip(classes, r["per_class_iou"], strict=True)
        ],
        ["label", "set_mode", "class", "iou"],
    )
    return rows


def draw_confusions(
    results: dict[str, dict[str, Any]], set_names: list[str], classes: list[str], out: Path
) -> None:
    """``confusion_<set>.png`` of each set's most global mode without TTA (and a note in
    place of ``confusion_large.png`` when there are no large images: DVC declares it)."""
    for set_name in set_names:
        key = _main_mode(results, set_name)
        confusion_matrix(
            results[key]["confusion"],
            classes,
            out / f"confusion_{set_name}.png",
            title=f"{set_name}: {key.split('/')[1]}",
        )
    if "large" not in set_names:
        _note(out / "confusion_large.png", "no large images (data.large.num_samples: 0)")


def _note(path: Path, text: str) -> None:
    """A PNG that only says ``text``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 1))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9)
    save_figure(fig, path)


def _main_mode(results: dict[str, Any], set_name: str) -> str:
    """The mode a set's confusion matrix shows: the most global one without TTA."""
    for mode in ("sliding_global", "sliding", "plain", "resize"):
        if f"{set_name}/{mode}" in results:
            return f"{set_name}/{mode}"
    raise KeyError(set_name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument(
        "--model",
        default=None,
        help=f"model folder or models:/NAME@ALIAS (default: evaluate.model, else {FINETUNED})",
    )
    parser.add_argument("--data", type=Path, default=PREPARED, help="prepared data folder")
    parser.add_argument(
        "--reports", type=Path, default=EVALUATE_REPORTS, help="report folder to write"
    )


def run(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import tracking

    params = load_params(args.params, args.overrides)
    with tracking.stage_run(
        "evaluate", params.model_dump(include={"evaluate"}), params.tracking.experiment
    ):
        out = evaluate(params.evaluate, args.model, args.data, args.reports)
        flat = tracking.flatten(out["metrics"])
        mlflow.log_metrics({k: float(v) for k, v in flat.items()})
        mlflow.set_tag("gattn.model", out["model"])
        mlflow.log_artifacts(str(args.reports), artifact_path="evaluate")
    print(f"evaluate: {json.dumps(out['metrics'])}")
    return 0
