"""FCOS math: locations, size ranges, target assignment, box coding, losses, decoding.

Paper: Tian, Shen, Chen, He 2019, "FCOS: Fully Convolutional One-Stage Object Detection"
(ICCV), https://arxiv.org/abs/1904.01355, with the improvements of its journal version and
official code (center sampling, GIoU loss, regression normalised by the stride).

Why FCOS and not CenterNet (Zhou et al. 2019, "Objects as Points") for small objects:
CenterNet predicts every object from one stride-4 heatmap, so a 4 px and a 200 px object
compete for the same map and the same receptive field. FCOS assigns each object to one FPN
level by its size (:func:`level_ranges`: the largest distance from a location to the box
edges must fall in the level's range), so with ``min_level=2`` objects up to 32 px are learnt
only on the stride-4 P2 map, where a 4-16 px object still covers several locations; on P3
(stride 8) such an object contains zero to two location centres and often gets no positive
location at all. The level structure is what makes P2 worth adding, and global context reaches
P2 through the FPN's top-down path.

Every location inside the central region of a box (center sampling, radius ``1.5`` strides)
whose size fits the level is positive for that box; a location claimed by several boxes takes
the smallest. Losses: sigmoid focal loss for classification (Lin et al. 2017, "Focal Loss for
Dense Object Detection"), GIoU (Rezatofighi et al. 2019) on ``(l, t, r, b)`` distances
weighted by the centerness target, binary cross-entropy for centerness.

Every function here has shapes fixed by its inputs (no boolean indexing, no ``.item()``), so
a training step also runs on fake tensors (:func:`gattn.budget.estimate_peak_memory`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import batched_nms, sigmoid_focal_loss

RANGE_SCALE = 8  # a level's objects reach up to RANGE_SCALE * stride from a location (P3: 64)
CENTER_RADIUS = 1.5  # center sampling radius in strides
FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
_EPS = 1e-7  # torchvision's generalized_box_iou_loss eps

Target = dict[str, torch.Tensor]


def level_points(
    sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device
) -> list[torch.Tensor]:
    """Image coordinates ``(h * w, 2)`` (x, y) of each level's locations, row-major.

    A location ``(i, j)`` of a stride-``s`` map sits at ``(j * s + s // 2, i * s + s // 2)``,
    the centre of its cell (FCOS's convention).

    Args:
        sizes: ``(h, w)`` of each level's map.
        strides: Stride of each level.
        device: Device of the points.
    """
    points = []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys = torch.arange(h, device=device, dtype=torch.float32) * s + s // 2
        xs = torch.arange(w, device=device, dtype=torch.float32) * s + s // 2
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return points


def level_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """Object size range ``(lo, hi]`` of each level: the largest location-to-edge distance.

    ``hi = RANGE_SCALE * stride`` (FCOS: 64, 128, 256, 512 for P3-P6), ``lo`` is the previous
    level's ``hi``; the finest level starts at 0 and the coarsest has no upper bound. With P2 the
    ranges are (0, 32], (32, 64], ...; with P3 first, (0, 64], (64, 128], ...
    """
    highs = [float(RANGE_SCALE * s) for s in strides[:-1]] + [math.inf]
    return [(0.0 if i == 0 else highs[i - 1], hi) for i, hi in enumerate(highs)]


def encode(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Distances ``(..., 4)`` (left, top, right, bottom) from ``points`` ``(..., 2)`` to the
    edges of ``boxes`` ``(..., 4)`` (x0, y0, x1, y1); positive inside the box."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack(
        [x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1
    )


def decode(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """Boxes ``(..., 4)`` (x0, y0, x1, y1) from ``points`` ``(..., 2)`` and distances
    ``(..., 4)``; the inverse of :func:`encode`."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def centerness(ltrb: torch.Tensor) -> torch.Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of positive distances
    ``(..., 4)``: 1 at a box's centre, towards 0 at its edges."""
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    ratio = (lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values)
    return ratio.clamp_min(0).sqrt()


def giou_loss_ltrb(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - GIoU`` of two boxes given as distances ``(..., 4)`` from the same point.

    Equal to ``torchvision.ops.generalized_box_iou_loss`` of the decoded boxes (same eps), but
    computed from the distances, as FCOS's ``IOULoss``: both boxes contain the point, so the
    intersection is ``(min(l) + min(r)) * (min(t) + min(b))``.
    """
    pred_area = (pred[..., 0] + pred[..., 2]) * (pred[..., 1] + pred[..., 3])
    target_area = (target[..., 0] + target[..., 2]) * (target[..., 1] + target[..., 3])
    lo, hi = torch.minimum(pred, target), torch.maximum(pred, target)
    inter = (lo[..., 0] + lo[..., 2]) * (lo[..., 1] + lo[..., 3])
    enclosing = (hi[..., 0] + hi[..., 2]) * (hi[..., 1] + hi[..., 3])
    union = pred_area + target_area - inter
    giou = inter / (union + _EPS) - (enclosing - union) / (enclosing + _EPS)
    return 1 - giou


def assign_targets(
    points: torch.Tensor,
    strides: torch.Tensor,
    ranges: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    *,
    center_radius: float = CENTER_RADIUS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS targets of one image's locations.

    A location is positive for a box when it lies strictly inside the box's central region
    (the box clipped to ``center_radius`` strides around its centre) and the largest of its
    four distances to the box edges is in the level's range ``(lo, hi]``; of several such
    boxes it takes the smallest by area.

    Args:
        points: Locations ``(L, 2)`` (x, y) of all levels, concatenated.
        strides: Stride of each location ``(L,)``.
        ranges: Size range ``(L, 2)`` of each location's level (see :func:`level_ranges`).
        boxes: Ground truth ``(N, 4)`` (x0, y0, x1, y1), input pixels; ``N`` may be 0.
        labels: Classes ``(N,)``.
        center_radius: Center sampling radius in strides.

    Returns:
        ``labels`` ``(L,)`` (``-1`` where negative) and ``ltrb`` ``(L, 4)`` distances to the
        assigned box (ones where negative, so every loss term stays finite).
    """
    num_points = points.shape[0]
    if boxes.shape[0] == 0:
        return (
            torch.full((num_points,), -1, dtype=torch.long, device=points.device),
            points.new_ones(num_points, 4),
        )
    ltrb = encode(points[:, None, :], boxes[None, :, :])  # (L, N, 4)
    centers = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
    radius = center_radius * strides[:, None, None]  # (L, 1, 1)
    region = torch.cat(
        [
            torch.maximum(centers - radius, boxes[:, :2]),
            torch.minimum(centers + radius, boxes[:, 2:]),
        ],
        dim=-1,
    )  # (L, N, 4)
    in_center = encode(points[:, None, :], region).min(-1).values > 0
    reach = ltrb.max(-1).values
    in_range = (reach > ranges[:, :1]) & (reach <= ranges[:, 1:])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cost = torch.where(in_center & in_range, areas[None, :], torch.inf)
    best, index = cost.min(dim=1)
    positive = torch.isfinite(best)
    assigned = torch.where(positive, labels[index], -1)
    target = ltrb[torch.arange(num_points, device=points.device), index]
    return assigned, torch.where(positive[:, None], target, torch.ones_like(target))


def flatten_levels(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-level maps ``(B, C, h_l, w_l)`` to ``(B, sum_l h_l * w_l, C)``, row-major."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


def fcos_loss(
    cls_logits: torch.Tensor,
    bbox_reg: torch.Tensor,
    ctr_logits: torch.Tensor,
    points: torch.Tensor,
    strides: torch.Tensor,
    ranges: torch.Tensor,
    targets: Sequence[Target],
    *,
    center_radius: float = CENTER_RADIUS,
) -> dict[str, torch.Tensor]:
    """FCOS losses of a batch, over all levels' locations.

    Args:
        cls_logits: ``(B, L, K)`` class logits.
        bbox_reg: ``(B, L, 4)`` predicted distances in input pixels (non-negative).
        ctr_logits: ``(B, L, 1)`` centerness logits.
        points, strides, ranges: As in :func:`assign_targets`.
        targets: Per image ``{"boxes": (N, 4) xyxy input pixels, "labels": (N,) in 0..K-1}``.
        center_radius: Center sampling radius in strides.

    Returns:
        ``loss_cls`` (focal, summed, per positive location), ``loss_box`` (GIoU weighted by
        the centerness target, per unit of that weight), ``loss_ctr`` (BCE per positive) and
        their sum ``loss``. Images without boxes add only negatives; with no positive at all
        the box and centerness terms are 0.
    """
    if len(targets) != cls_logits.shape[0]:
        raise ValueError(f"{len(targets)} targets for a batch of {cls_logits.shape[0]} images")
    with torch.no_grad():
        assigned = [
            assign_targets(
                points,
                strides,
                ranges,
                t["boxes"].float(),
                t["labels"],
                center_radius=center_radius,
            )
            for t in targets
        ]
        labels = torch.stack([a[0] for a in assigned])  # (B, L)
        ltrb = torch.stack([a[1] for a in assigned])  # (B, L, 4)
        positive = (labels >= 0).float()
        num_pos = positive.sum().clamp_min(1.0)
        ctr_target = centerness(ltrb)
        ctr_weight = (ctr_target * positive).sum().clamp_min(_EPS)
        classes = torch.arange(cls_logits.shape[-1], device=labels.device)
        one_hot = (labels[..., None] == classes).to(cls_logits.dtype)  # all 0 where negative
    loss_cls = (
        sigmoid_focal_loss(
            cls_logits, one_hot, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="sum"
        )
        / num_pos
    )
    loss_box = (giou_loss_ltrb(bbox_reg, ltrb) * ctr_target * positive).sum() / ctr_weight
    bce = F.binary_cross_entropy_with_logits(ctr_logits[..., 0], ctr_target, reduction="none")
    loss_ctr = (bce * positive).sum() / num_pos
    return {
        "loss": loss_cls + loss_box + loss_ctr,
        "loss_cls": loss_cls,
        "loss_box": loss_box,
        "loss_ctr": loss_ctr,
    }


def fcos_postprocess(
    cls_logits: torch.Tensor,
    bbox_reg: torch.Tensor,
    ctr_logits: torch.Tensor,
    points: torch.Tensor,
    level_sizes: Sequence[int],
    image_size: tuple[int, int],
    *,
    score_thresh: float = 0.05,
    nms_iou: float = 0.6,
    max_det: int = 100,
    pre_nms_top_k: int = 1000,
) -> list[Target]:
    """Boxes from FCOS outputs: score, top-k per level, decode, clip, class-wise NMS.

    The score of a location and class is ``sqrt(sigmoid(cls) * sigmoid(ctr))`` (the
    centerness down-weights off-centre locations; the square root keeps the scale of a
    probability, as in the official code and torchvision).

    Args:
        cls_logits, bbox_reg, ctr_logits, points: As in :func:`fcos_loss` (flattened levels).
        level_sizes: Locations per level, in the flattened order.
        image_size: ``(H, W)`` of the input, to clip the boxes to.
        score_thresh: Minimum score of a kept box.
        nms_iou: IoU above which ``torchvision.ops.batched_nms`` suppresses a box of the same
            class.
        max_det: Most boxes per image, by score.
        pre_nms_top_k: Most candidates per level before NMS.

    Returns:
        Per image ``{"boxes": (n, 4) xyxy, "scores": (n,), "labels": (n,)}``, by score.
    """
    scores_all = (cls_logits.sigmoid() * ctr_logits.sigmoid()).sqrt()  # (B, L, K)
    num_classes = scores_all.shape[-1]
    height, width = image_size
    results = []
    for scores, reg in zip(scores_all, bbox_reg, strict=True):
        boxes, kept_scores, labels = [], [], []
        for level_scores, level_reg, level_points in zip(
            scores.split(list(level_sizes)),
            reg.split(list(level_sizes)),
            points.split(list(level_sizes)),
            strict=True,
        ):
            flat = level_scores.flatten()
            candidates = torch.nonzero(flat > score_thresh).squeeze(1)
            top = flat[candidates].topk(min(pre_nms_top_k, candidates.numel())).indices
            index = candidates[top]
            loc = index // num_classes
            boxes.append(decode(level_points[loc], level_reg[loc]))
            kept_scores.append(flat[index])
            labels.append(index % num_classes)
        box = torch.cat(boxes)
        box[:, 0::2] = box[:, 0::2].clamp(0, width)
        box[:, 1::2] = box[:, 1::2].clamp(0, height)
        results.append(
            merge_detections(box, torch.cat(kept_scores), torch.cat(labels), nms_iou, max_det)
        )
    return results


def merge_detections(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    nms_iou: float,
    max_det: int,
    priority: torch.Tensor | None = None,
) -> Target:
    """Class-wise NMS (``torchvision.ops.batched_nms``), then the ``max_det`` best by score.

    Args:
        boxes, scores, labels: Candidates ``(n, 4)``, ``(n,)``, ``(n,)``.
        nms_iou: IoU above which a box of the same class is suppressed.
        max_det: Most boxes kept.
        priority: Order of suppression where it differs from ``scores`` (a box suppresses
            the overlapping ones of lower priority); ``None``: by score.
    """
    keep = batched_nms(boxes, scores if priority is None else priority, labels, nms_iou)
    keep = keep[scores[keep].argsort(descending=True, stable=True)][:max_det]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
