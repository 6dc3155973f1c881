"""COCO box AP of detections: torchmetrics' ``MeanAveragePrecision`` on the faster-coco-eval
backend, summarised as plain floats.

The COCO protocol (Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014;
https://cocodataset.org/#detection-eval): AP averaged over IoU 0.50:0.05:0.95 (``map``), at
IoU 0.5 (``map_50``) and 0.75 (``map_75``), by object area (``map_small`` < 32² px <=
``map_medium`` < 96² px <= ``map_large``), and recall at 100 detections (``mar_100``). Areas are
those of the target boxes in the pixels they are given in: score boxes at the images' own
resolution (rescale predictions back) so that "small" means what COCO means. faster-coco-eval
gives pycocotools' ``COCOeval`` numbers (checked in the tests) several times faster.

A figure with nothing to measure (no target box of that size, or no class present) is ``nan``
here, where COCO writes -1.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torchmetrics.detection import MeanAveragePrecision

__all__ = ["DETECTION_METRICS", "detection_metric", "score_detections", "summarise_detection"]

DETECTION_METRICS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")
Detections = Sequence[dict[str, torch.Tensor]]

# faster-coco-eval logs COCO's 12-line summary at INFO on every compute(); where INFO is shown
# (Ray Train workers) that is noise in a run's output, and callers report the figures anyway.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)


def detection_metric(
    class_metrics: bool = False,
    backend: Literal["faster_coco_eval", "pycocotools"] = "faster_coco_eval",
) -> MeanAveragePrecision:
    """A COCO box-AP metric for ``update(preds, targets)`` over batches.

    ``preds``: per image ``{"boxes": (N, 4) xyxy px, "scores": (N,), "labels": (N,) long}``;
    ``targets``: per image ``{"boxes": (M, 4) xyxy px, "labels": (M,) long}`` (other keys,
    such as ``image_id``, are ignored).

    Args:
        class_metrics: also AP per class (``per_class_map`` of :func:`summarise_detection`).
        backend: the COCO implementation torchmetrics calls.
    """
    return MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", class_metrics=class_metrics, backend=backend
    )


def _value(x: torch.Tensor | float) -> float:
    v = float(x)
    return math.nan if v == -1 else v


def summarise_detection(
    values: dict[str, torch.Tensor], num_classes: int | None = None
) -> dict[str, Any]:
    """Plain floats of a computed :func:`detection_metric`: :data:`DETECTION_METRICS`, and
    with ``num_classes`` (of a metric built with ``class_metrics=True``) ``per_class_map``: a
    list in label order, None for a class in neither predictions nor targets."""
    out: dict[str, Any] = {k: _value(values[k]) for k in DETECTION_METRICS}
    if num_classes is not None:
        if "map_per_class" not in values:
            raise ValueError("per-class AP needs detection_metric(class_metrics=True)")
        per: list[float | None] = [None] * num_classes
        classes = values["classes"].reshape(-1).tolist()
        aps = values["map_per_class"].reshape(-1).tolist()
        for c, ap in zip(classes, aps, strict=True):
            per[c] = None if ap == -1 else float(ap)
        out["per_class_map"] = per
    return out


def score_detections(
    preds: Detections, targets: Detections, num_classes: int | None = None
) -> dict[str, Any]:
    """:func:`summarise_detection` of ``preds`` against ``targets`` in one call (per class
    too with ``num_classes``)."""
    metric = detection_metric(class_metrics=num_classes is not None)
    metric.update(list(preds), list(targets))
    return summarise_detection(metric.compute(), num_classes)
