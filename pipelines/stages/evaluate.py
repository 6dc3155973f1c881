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

Detectors are scored on boxes in each image's own pixels (so that COCO's "small" is
COCO's): the test images at their own size, run at ``img_size`` (``plain``:
:func:`gattn.inference.resized_detect`, boxes scaled back), and the large images in the same
modes as a segmenter (``resize``, ``whole``, ``sliding`` and ``sliding_global``:
:func:`gattn.inference.sliding_window_detect`), each also under
:func:`gattn.inference.tta_detect` (boxes flipped and rescaled back, merged by NMS).

Scores (torchmetrics): accuracy (of pixels for segmentation), mIoU, per-class IoU, the
confusion matrix; for detection COCO box AP (:func:`gattn.metrics.score_detections`,
faster-coco-eval): mAP, AP50, AP75, AP_small, AP_medium, AP_large, AR@100 and AP per class;
wall time per image (median, after a warm-up); and the effective receptive field of the
model (Luo et al. 2016): the shares of the input area holding 20/50/99% of the centre
output's gradient, this project's "how global" number (a detector's: of its finest level's
class logits, :class:`gattn.diagnostics.detection.FinestClassMap`).

Reads ``evaluate`` (and ``tracking``) from params.yaml, ``models/finetuned/`` (or
``evaluate.model``: a registry URI or a folder) and ``data/prepared/``. Writes
``reports/evaluate/``: ``metrics.json`` (``dvc metrics``), ``results.csv`` and
``per_class_iou.csv`` (``dvc plots``), ``confusion_test.png``, ``confusion_large.png``,
``erf.png``; for detection ``per_class_ap.csv`` and ``detections.png`` (annotated and
predicted boxes on a few test images) instead of the per-class IoU (a header only) and the
confusion matrices (a note each); all logged to MLflow.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from gattn.diagnostics import (
    confusion_matrix,
    effective_receptive_field,
    heatmap,
    sample_grid,
    save_figure,
)
from gattn.diagnostics.detection import FinestClassMap
from gattn.diagnostics.grad_cam import to_nchw
from gattn.inference import (
    BoxRunner,
    resize_input,
    resized_detect,
    sliding_window,
    sliding_window_detect,
    tta,
    tta_detect,
)
from gattn.inference.detection import BoxPredictor
from gattn.inference.tta import Task as DenseTask
from gattn.inference.tta import resize as resize_output
from gattn.metrics.detection import detection_metric, summarise_detection
from gattn.models import load_model
from gattn.models.detector import Detector
from gattn.models.io import CONFIG
from pipelines.config import EvaluateParams, ModelTask, add_params_arguments, load_params
from pipelines.contracts import MODEL_FIX, ModelMeta, check
from pipelines.data import Sample, Split, open_split, read_splits, subset
from pipelines.io import write_csv, write_json
from pipelines.metrics import summarise, task_metrics
from pipelines.paths import EVALUATE_REPORTS, FINETUNED, PREPARED
from pipelines.serve.predictor import InputSpec, fixed_input_size

Runner = Callable[[torch.Tensor], torch.Tensor]
# The figures of each task that metrics.json, results.csv and the log show.
SHOWN: dict[ModelTask, tuple[str, ...]] = {
    "seg": ("accuracy", "miou"),
    "cls": ("accuracy", "miou"),
    "det": ("map", "map_50", "map_small", "map_medium"),
}
DRAWN_IMAGES = 4  # test images in detections.png
DRAWN_SCORE = 0.3  # predicted boxes drawn from this score


class Scorer(Protocol):
    """Scores of one inference mode over a data set, ``batch_size`` images a call."""

    def __call__(self, dataset: Split, *, batch_size: int) -> dict[str, Any]: ...


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
    run: Runner, model: nn.Module, task: DenseTask, size: int, p: EvaluateParams
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


def box_runners(
    model: Detector, size: int, p: EvaluateParams, large: bool
) -> dict[str, BoxPredictor]:
    """Name -> box inference of every mode that applies to a detector (the module docstring):
    each a ``predict(images)`` whose boxes are in the images' own pixels."""

    def windows(context: Literal["auto"] | None) -> BoxPredictor:
        return BoxRunner(
            functools.partial(
                sliding_window_detect,
                model,
                window=size,
                overlap=round(p.overlap * size),
                batch_size=p.window_batch_size,
                global_context=context,
            )
        )

    shrunk = BoxRunner(functools.partial(resized_detect, model, size=size))
    if not large:
        return {"plain": shrunk}
    modes: dict[str, BoxPredictor] = {"resize": shrunk}
    if not fixed_input_size(model):
        modes["whole"] = model
    modes["sliding"] = windows(None)
    modes["sliding_global"] = windows("auto")
    return modes


def chunks(dataset: Split, batch_size: int) -> Iterator[list[Sample]]:
    """``dataset``'s samples in order, up to ``batch_size`` at a time, each chunk of one
    image size (a new chunk starts where the size changes)."""
    chunk: list[Sample] = []
    for i in range(len(dataset)):
        sample = dataset[i]
        if chunk and (len(chunk) == batch_size or sample[0].shape != chunk[0][0].shape):
            yield chunk
            chunk = []
        chunk.append(sample)
    if chunk:
        yield chunk


def timed(
    run: Callable[[torch.Tensor], Any], dataset: Split, batch_size: int, per_image: list[float]
) -> Iterator[tuple[Any, list[Any]]]:
    """``(run(images), targets)`` over ``dataset`` (:func:`chunks`); after one untimed
    warm-up call on the first image, every call is timed and its time per image appended to
    ``per_image``."""
    run(dataset[0][0][None])
    for chunk in chunks(dataset, batch_size):
        images = torch.stack([x for x, _ in chunk])
        t0 = time.perf_counter()
        out = run(images)
        per_image.append((time.perf_counter() - t0) / len(chunk))
        yield out, [t for _, t in chunk]


@torch.no_grad()
def score_mode(
    run: Runner, dataset: Split, task: ModelTask, num_classes: int, batch_size: int
) -> dict[str, Any]:
    """Scores of ``run`` over ``dataset``, and its wall time per image.

    Images run ``batch_size`` at a time (1 for latency proper); ``ms_per_image`` is the
    median of call time / images in the call (:func:`timed`).
    """
    metrics = task_metrics(task, num_classes)
    per_image: list[float] = []
    for logits, targets in timed(run, dataset, batch_size, per_image):
        metrics.update(logits.argmax(1), torch.stack([torch.as_tensor(t) for t in targets]))
    return {**summarise(metrics.compute()), "ms_per_image": 1000 * statistics.median(per_image)}


@torch.no_grad()
def score_boxes(
    run: BoxPredictor, dataset: Split, num_classes: int, batch_size: int
) -> dict[str, Any]:
    """COCO box AP of ``run``'s detections over ``dataset`` (per class too:
    :func:`gattn.metrics.detection.summarise_detection`), and its wall time per image (as
    :func:`score_mode`)."""
    metric = detection_metric(class_metrics=True)
    per_image: list[float] = []
    for found, targets in timed(run.predict, dataset, batch_size, per_image):
        metric.update(found, targets)
    out = summarise_detection(metric.compute(), num_classes)
    return {**out, "ms_per_image": 1000 * statistics.median(per_image)}


def scorers(model: nn.Module, meta: ModelMeta, p: EvaluateParams, large: bool) -> dict[str, Scorer]:
    """``"<mode>[_tta]"`` -> the scorer of every inference mode that applies to the model on
    the test set (``large=False``) or the large images, without and with TTA."""
    task, size, k = meta.task, meta.img_size, len(meta.classes)
    out: dict[str, Scorer] = {}
    if isinstance(model, Detector):
        for mode, boxes in box_runners(model, size, p, large).items():
            tta_run = functools.partial(tta_detect, boxes, scales=p.tta_scales, flip=p.tta_flip)
            out[mode] = functools.partial(score_boxes, boxes, num_classes=k)
            out[f"{mode}_tta"] = functools.partial(score_boxes, BoxRunner(tta_run), num_classes=k)
        return out
    if task == "det":
        raise TypeError(f"config.json says task det, but {type(model).__name__} is no detector")
    for mode, run in runners(model, task, size, p, large).items():
        augmented = with_tta(run, model, task, size, p)
        out[mode] = functools.partial(score_mode, run, task=task, num_classes=k)
        out[f"{mode}_tta"] = functools.partial(score_mode, augmented, task=task, num_classes=k)
    return out


@runtime_checkable
class _HasFeatures(Protocol):
    """A timm-style classifier: its last feature map (or tokens) before pooling."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...


def feature_map(model: nn.Module, task: ModelTask) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``(B, K, h, w)`` map for the ERF: a segmenter's logits, a detector's finest class
    logits, or a classifier's last feature map (tokens laid on their grid, NHWC permuted)."""
    if task == "seg":
        return model
    if isinstance(model, Detector):
        return FinestClassMap(model)

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
    ``test`` (its first ``max_samples``) at ``spec.img_size`` (a detector's at each image's
    own size: it is scored in those pixels), and ``large`` at full size when the prepared data
    has large images."""
    info = read_splits(prepared)
    test = open_split("test", prepared, spec.transform(resize=spec.task != "det"))
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

    torch.set_num_threads(p.num_threads)
    folder = resolve_model(model_dir or p.model or FINETUNED)
    model, cfg = load_model(folder)
    meta = check(ModelMeta, cfg, Path(folder) / CONFIG, MODEL_FIX)
    spec = InputSpec.of(model, cfg, str(folder))
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    sets = open_sets(spec, prepared, p.max_samples)
    results = score_all(model, meta, sets, p)
    size = (meta.img_size, meta.img_size)
    images = [
        resize_input(sets["test"][i][0][None], size)[0]
        for i in range(min(p.erf_images, len(sets["test"])))
    ]
    erf = effective_receptive_field(feature_map(model, meta.task), torch.stack(images))
    heatmap(erf.map.numpy(), reports_dir / "erf.png", title="effective receptive field", log=True)
    rows = write_tables(results, meta.task, meta.classes, reports_dir)
    if isinstance(model, Detector):
        plain = box_runners(model, meta.img_size, p, large=False)["plain"]
        pictures = open_split("test", prepared)
        draw_detections(plain, sets["test"], pictures, meta.classes, reports_dir)
    else:
        draw_confusions(results, list(sets), meta.classes, reports_dir)
    shown = (*SHOWN[meta.task], "ms_per_image")
    metrics: dict[str, Any] = {
        key.replace("/", "."): {m: r[m] for m in shown} for key, r in results.items()
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
    results: dict[str, dict[str, Any]] = {}
    for set_name, dataset in sets.items():
        batch = p.batch_size if set_name == "test" else 1
        for mode, scorer in scorers(model, meta, p, set_name == "large").items():
            key = f"{set_name}/{mode}"
            results[key] = scorer(dataset, batch_size=batch)
            figures = " ".join(f"{m}={results[key][m]:.4f}" for m in SHOWN[meta.task])
            print(f"evaluate: {key}: {figures}", flush=True)
    return results


def write_tables(
    results: dict[str, dict[str, Any]], task: ModelTask, classes: list[str], reports_dir: Path
) -> list[dict[str, Any]]:
    """``results.csv`` (one row per set and mode with the task's :data:`SHOWN` figures,
    returned) and ``per_class_iou.csv``, or for detection ``per_class_ap.csv`` (and a
    ``per_class_iou.csv`` with its header only, as DVC declares it)."""
    rows = [
        {
            "set_mode": key,
            "set": key.split("/")[0],
            "mode": key.split("/")[1],
            **{m: r[m] for m in SHOWN[task]},
            "ms_per_image": r["ms_per_image"],
        }
        for key, r in results.items()
    ]
    write_csv(reports_dir / "results.csv", rows, list(rows[0]))
    figure, column = ("per_class_map", "ap") if task == "det" else ("per_class_iou", "iou")
    columns = ["label", "set_mode", "class", column]
    write_csv(
        reports_dir / f"per_class_{column}.csv",
        [
            {"label": f"{key} {name}", "set_mode": key, "class": name, column: value}
            for key, r in results.items()
            for name, value in zip(classes, r[figure], strict=True)
        ],
        columns,
    )
    if task == "det":
        write_csv(reports_dir / "per_class_iou.csv", [], ["label", "set_mode", "class", "iou"])
    return rows


def draw_detections(
    run: BoxPredictor, test: Split, pictures: Split, classes: list[str], out: Path
) -> None:
    """``detections.png``: the first :data:`DRAWN_IMAGES` test images with their annotated
    boxes (top row) and ``run``'s from :data:`DRAWN_SCORE` (bottom row); and a note in place
    of each confusion matrix DVC declares.

    Args:
        run: The detector as scored on the test set (its ``plain`` mode).
        test: The test set as scored (model inputs).
        pictures: The same images as floats in ``[0, 1]`` (:func:`open_split` untransformed).
        classes: Class names.
        out: The report folder.
    """
    n = min(DRAWN_IMAGES, len(test))
    shown, truth, found = [], [], []
    for i in range(n):
        picture, target = pictures[i]
        shown.append((picture.permute(1, 2, 0) * 255).round().byte().numpy())
        truth.append({k: target[k].numpy() for k in ("boxes", "labels")})
        (boxes,) = run.predict(test[i][0][None], score_thresh=DRAWN_SCORE)
        found.append({k: boxes[k].numpy() for k in ("boxes", "labels")})
    sample_grid(
        shown + shown,
        truth + found,
        classes,
        out / "detections.png",
        columns=n,
        title=f"test images: annotated (top), predicted from score {DRAWN_SCORE} (bottom)",
    )
    for set_name in ("test", "large"):
        _note(out / f"confusion_{set_name}.png", "detection: boxes in detections.png")


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
