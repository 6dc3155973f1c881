"""Classification, segmentation and detection scores shared by the tune, finetune and evaluate
stages.

torchmetrics accumulates over batches (and, where a process group is up, across workers):
accuracy (of images, or of labelled pixels), per-class IoU (Jaccard) with classes absent from
both prediction and target left out of the mean (``nan``, not 0), and the confusion matrix.
Segmentation targets use :data:`gattn.data.IGNORE_INDEX` (255) as "ignore".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassJaccardIndex,
)

from gattn.data.datasets import IGNORE_INDEX
from gattn.inference.preprocess import resize_input
from pipelines.config import Task

# The selection metric of each task (detection: COCO box mAP, gattn.metrics.detection).
METRIC: dict[Task, str] = {"seg": "miou", "cls": "accuracy", "det": "map"}


def task_metrics(task: Task, num_classes: int) -> MetricCollection:
    """Accuracy, per-class IoU and the confusion matrix for ``task``'s targets."""
    ignore = IGNORE_INDEX if task == "seg" else None
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore),
            "iou": MulticlassJaccardIndex(
                num_classes, average="none", ignore_index=ignore, zero_division=math.nan
            ),
            "confusion": MulticlassConfusionMatrix(num_classes, ignore_index=ignore),
        }
    )


def summarise(values: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{accuracy, miou, per_class_iou, confusion}`` (plain floats and lists) of a computed
    :func:`task_metrics` collection. ``miou`` averages the classes that occur."""
    iou = values["iou"].double()
    present = iou[~iou.isnan()]
    return {
        "accuracy": float(values["accuracy"]),
        "miou": float(present.mean()) if present.numel() else math.nan,
        "per_class_iou": [None if math.isnan(v) else float(v) for v in iou.tolist()],
        "confusion": values["confusion"].long().tolist(),
    }


@torch.no_grad()
def score(
    predict: Any,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    task: Task,
    num_classes: int,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """:func:`summarise` of ``predict(images)`` (logits or probabilities, class dim 1) over
    ``(images, targets)`` batches."""
    metrics = task_metrics(task, num_classes).to(device)
    for images, targets in batches:
        out = predict(images.to(device))
        metrics.update(out.argmax(1), targets.to(device))
    return summarise(metrics.compute())


@torch.no_grad()
def score_resized(
    model: torch.nn.Module,
    batches: Iterable[Sequence[Any]],
    task: Task,
    size: int,
    num_classes: int,
) -> dict[str, Any]:
    """:func:`score` of ``model`` over ``(images, targets, ...)`` batches (a stream of a split;
    further items ignored), the images resized to ``size`` px
    (:func:`gattn.inference.resize_input`, as in training and serving); segmentation logits
    are resized back to the targets' resolution, so models trained at any resolution are
    scored on the same masks; a detector is scored by :func:`score_detector`. ``model``'s
    train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    if task == "det":
        out = score_detector(model, batches, size)
        model.train(was_training)
        return out
    device = next(model.parameters()).device

    def predict(x: torch.Tensor) -> torch.Tensor:
        logits = model(resize_input(x, (size, size)))
        if task == "seg" and logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    pairs = ((batch[0], batch[1]) for batch in batches)
    out = score(predict, pairs, task, num_classes, device)
    model.train(was_training)
    return out


@torch.no_grad()
def score_detector(
    model: torch.nn.Module, batches: Iterable[Sequence[Any]], size: int
) -> dict[str, Any]:
    """COCO box mAP and its companions (:func:`gattn.metrics.score_detections`) of a detector
    (:class:`gattn.models.Detector`, in eval mode) over ``(images, targets, ...)`` batches:
    the images resized to ``size`` px as in training, the predicted boxes scaled back to the
    targets' pixels."""
    from gattn.metrics import score_detections

    device = next(model.parameters()).device
    preds: list[dict[str, torch.Tensor]] = []
    truth: list[dict[str, torch.Tensor]] = []
    for batch in batches:
        images, targets = batch[0], batch[1]
        h, w = images.shape[-2:]
        scale = torch.tensor([w / size, h / size, w / size, h / size])
        for det in model.predict(resize_input(images, (size, size)).to(device)):  # type: ignore[operator]
            preds.append(
                {**{k: v.cpu() for k, v in det.items()}, "boxes": det["boxes"].cpu() * scale}
            )
        truth += [{"boxes": t["boxes"].cpu(), "labels": t["labels"].cpu()} for t in targets]
    return score_detections(preds, truth)


def class_counts(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """How many of ``targets`` (pixels or labels; 255 ignored) hold each class: sums over
    batches add up to the counts of a whole split."""
    valid = targets[targets != IGNORE_INDEX].flatten().long()
    return torch.bincount(valid, minlength=num_classes)[:num_classes]


def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """Loss weights ``1 / sqrt(frequency)`` of each class from its :func:`class_counts`,
    scaled so the average weight per target is 1; absent classes get the largest weight."""
    freq = counts.double()
    freq = freq / freq.sum().clamp(min=1)
    w = freq.clamp(min=freq[freq > 0].min() if (freq > 0).any() else 1.0).rsqrt()
    return (w / (w * freq).sum().clamp(min=1e-12)).float()
