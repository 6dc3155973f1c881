"""COCO box AP: the faster-coco-eval figures equal pycocotools' COCOeval on a hand-made sample;
perfect detections score 1, none score 0."""

from __future__ import annotations

import contextlib
import io
import logging
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from gattn.metrics import DETECTION_METRICS, detection_metric, score_detections
from gattn.metrics.detection import summarise_detection

# Per image: target boxes (xyxy) and labels; small (< 32²), medium and large (> 96²) objects.
TARGETS = [
    ([[10, 10, 20, 20], [50, 50, 100, 90], [0, 100, 130, 200]], [0, 1, 2]),
    ([[5, 5, 12, 15], [30, 30, 38, 37], [100, 20, 160, 60]], [0, 0, 1]),
    ([[0, 0, 150, 120]], [2]),
    ([[60, 60, 66, 70], [120, 120, 180, 170]], [1, 1]),
]


def _targets() -> list[dict[str, torch.Tensor]]:
    return [
        {"boxes": torch.tensor(b, dtype=torch.float32), "labels": torch.tensor(lab)}
        for b, lab in TARGETS
    ]


def _predictions(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Jittered copies of the targets (some with the wrong label, some dropped), plus false
    positives, with random scores."""
    rng = np.random.default_rng(seed)
    preds = []
    for boxes, labels in TARGETS:
        b = np.asarray(boxes, np.float64)
        size = np.concatenate([b[:, 2:] - b[:, :2]] * 2, 1)
        b = b + rng.normal(0, 0.08, b.shape) * size
        lab = np.asarray(labels)
        lab = np.where(rng.random(len(lab)) < 0.2, (lab + 1) % 3, lab)
        keep = rng.random(len(lab)) > 0.15
        fp = rng.uniform(0, 150, (2, 2))
        fp = np.concatenate([fp, fp + rng.uniform(5, 50, (2, 2))], 1)
        preds.append(
            {
                "boxes": torch.tensor(np.concatenate([b[keep], fp]), dtype=torch.float32),
                "scores": torch.tensor(rng.random(int(keep.sum()) + 2), dtype=torch.float32),
                "labels": torch.tensor(np.concatenate([lab[keep], rng.integers(0, 3, 2)])),
            }
        )
    return preds


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.double().clone()
    b[:, 2:] -= b[:, :2]
    return b.tolist()


def _pycocotools(preds: list[dict], targets: list[dict]) -> np.ndarray:
    """COCOeval's 12 summary figures, categories as label + 1 (COCO's ids start at 1)."""
    boxes = [
        (i + 1, box, int(lab) + 1)
        for i, t in enumerate(targets)
        for box, lab in zip(_xywh(t["boxes"]), t["labels"].tolist(), strict=True)
    ]
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i + 1, "width": 200, "height": 200} for i in range(len(targets))],
        "categories": [{"id": k + 1, "name": str(k)} for k in range(3)],
        "annotations": [
            {
                "id": n + 1,  # from 1: COCOeval reads an id of 0 as "unmatched"
                "image_id": image_id,
                "category_id": category,
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": 0,
            }
            for n, (image_id, box, category) in enumerate(boxes)
        ],
    }
    dets = [
        {"image_id": i + 1, "category_id": int(lab) + 1, "bbox": box, "score": float(s)}
        for i, p in enumerate(preds)
        for box, lab, s in zip(
            _xywh(p["boxes"]), p["labels"].tolist(), p["scores"].tolist(), strict=True
        )
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


@pytest.mark.parametrize("seed", [0, 1])
def test_equals_pycocotools(seed: int) -> None:
    preds, targets = _predictions(seed), _targets()
    ours = score_detections(preds, targets)
    ref = _pycocotools(preds, targets)
    # COCOeval.stats: AP, AP50, AP75, AP small, medium, large, AR1, AR10, AR100, ...
    expected = dict(zip(DETECTION_METRICS, [*ref[:6], ref[8]], strict=True))
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert 0.05 < ours["map"] < 0.95  # a sample that tests something


def test_batches_accumulate() -> None:
    preds, targets = _predictions(), _targets()
    metric = detection_metric()
    for i in range(0, len(preds), 2):
        metric.update(preds[i : i + 2], targets[i : i + 2])
    assert summarise_detection(metric.compute()) == score_detections(preds, targets)


def test_perfect_and_empty() -> None:
    targets = _targets()
    perfect = [{**t, "scores": torch.ones(len(t["labels"]))} for t in targets]
    out = score_detections(perfect, targets, num_classes=4)
    assert all(out[k] == 1.0 for k in DETECTION_METRICS)
    assert out["per_class_map"] == [1.0, 1.0, 1.0, None]  # class 3: in no image
    empty = [
        {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}
        for _ in targets
    ]
    out = score_detections(empty, targets)
    assert all(out[k] == 0.0 for k in DETECTION_METRICS)
    # No target of a size: nan (COCO's -1), not a score.
    small_only = [{"boxes": torch.tensor([[0.0, 0, 8, 8]]), "labels": torch.tensor([0])}]
    out = score_detections([{**small_only[0], "scores": torch.ones(1)}], small_only)
    assert out["map_small"] == 1.0 and math.isnan(out["map_large"])


def test_scoring_logs_no_coco_summary(caplog: pytest.LogCaptureFixture) -> None:
    """faster-coco-eval's 12-line summary (INFO) stays out of a run's output even where INFO
    is shown, as in Ray Train workers."""
    caplog.set_level(logging.INFO)
    score_detections(_predictions(), _targets())
    assert not [r for r in caplog.records if r.name.startswith("faster_coco_eval")]
