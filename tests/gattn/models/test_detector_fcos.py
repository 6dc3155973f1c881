"""FCOS math: hand-computed assignment, box coding, and the losses against plain references
(torchvision's GIoU loss and focal loss on the positives picked out by boolean indexing)."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from gattn.models.fcos import (
    assign_targets,
    centerness,
    decode,
    encode,
    fcos_loss,
    giou_loss_ltrb,
    level_points,
    level_ranges,
)

INF = math.inf


def test_level_points_are_cell_centres() -> None:
    (points,) = level_points([(2, 3)], [8], torch.device("cpu"))
    expected = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert points.tolist() == expected


def test_level_ranges_start_at_the_finest_level() -> None:
    assert level_ranges([4, 8, 16, 32]) == [(0, 32), (32, 64), (64, 128), (128, INF)]
    assert level_ranges([8, 16, 32]) == [(0, 64), (64, 128), (128, INF)]


def hand_case() -> tuple[torch.Tensor, ...]:
    """Six locations on two levels and three boxes, worked out by hand:

    A = [0, 0, 8, 8] (class 1), C = [0, 0, 20, 20] (class 2), B = [0, 0, 80, 80] (class 0).
    Stride 4 (range (0, 32]) and stride 8 (range (32, inf)); center regions are 1.5 strides
    around a box's centre, clipped to the box.

    - (2, 2)/4: inside A's region, reach 6: A. C's region is [4, 4, 16, 16]: outside.
    - (6, 6)/4: A (reach 6) and C (reach 14) both qualify: the smaller, A.
    - (14, 14)/4: outside A; inside C's region, reach 14: C, ltrb (14, 14, 6, 6).
    - (4, 4)/8: A and C are too small for the level (reach 4, 16 <= 32); B's region is
      [28, 28, 52, 52]: outside. Negative.
    - (36, 44)/8: inside B's region, reach 44 > 32: B, ltrb (36, 44, 44, 36).
    - (60, 60)/8: inside B but outside its central region: negative (center sampling).
    """
    points = torch.tensor([[2, 2], [6, 6], [14, 14], [4, 4], [36, 44], [60, 60]]).float()
    strides = torch.tensor([4, 4, 4, 8, 8, 8]).float()
    ranges = torch.tensor([[0, 32]] * 3 + [[32, INF]] * 3)
    boxes = torch.tensor([[0, 0, 8, 8], [0, 0, 20, 20], [0, 0, 80, 80]]).float()
    labels = torch.tensor([1, 2, 0])
    return points, strides, ranges, boxes, labels


def test_assignment_matches_the_hand_computed_case() -> None:
    labels, ltrb = assign_targets(*hand_case())
    assert labels.tolist() == [1, 1, 2, -1, 0, -1]
    assert ltrb[[0, 1, 2, 4]].tolist() == [
        [2, 2, 6, 6],
        [6, 6, 2, 2],
        [14, 14, 6, 6],
        [36, 44, 44, 36],
    ]
    assert ltrb[[3, 5]].tolist() == [[1, 1, 1, 1]] * 2  # negatives: finite dummies


def test_without_center_sampling_the_whole_box_is_positive() -> None:
    labels, ltrb = assign_targets(*hand_case(), center_radius=100.0)
    assert labels[5] == 0 and ltrb[5].tolist() == [60, 60, 20, 20]
    assert labels[3] == 0 and ltrb[3].tolist() == [4, 4, 76, 76]  # B's, reach 76 > 32
    assert labels[:3].tolist() == [1, 1, 2]  # the stride-4 locations keep the small boxes


def test_no_boxes_gives_all_negatives() -> None:
    points, strides, ranges, _, _ = hand_case()
    labels, ltrb = assign_targets(points, strides, ranges, torch.zeros(0, 4), torch.zeros(0))
    assert (labels == -1).all() and ltrb.shape == (6, 4)


def test_decode_inverts_encode() -> None:
    torch.manual_seed(0)
    xy0 = torch.rand(50, 2) * 100
    boxes = torch.cat([xy0, xy0 + torch.rand(50, 2) * 40 + 1], dim=1)
    points = xy0 + torch.rand(50, 2) * (boxes[:, 2:] - xy0)
    ltrb = encode(points, boxes)
    assert (ltrb > 0).all()
    torch.testing.assert_close(decode(points, ltrb), boxes)
    torch.testing.assert_close(encode(points, decode(points, ltrb)), ltrb)


def test_centerness_is_one_at_the_centre() -> None:
    values = centerness(torch.tensor([[5.0, 5, 5, 5], [1, 4, 3, 4], [1, 1, 9, 1]]))
    torch.testing.assert_close(values, torch.tensor([1.0, math.sqrt(1 / 3), 1 / 3]))


def test_giou_from_distances_equals_torchvision() -> None:
    torch.manual_seed(0)
    points = torch.rand(200, 2) * 50
    pred, target = torch.rand(200, 4) * 20, torch.rand(200, 4) * 20 + 0.5
    reference = generalized_box_iou_loss(decode(points, pred), decode(points, target))
    torch.testing.assert_close(giou_loss_ltrb(pred, target), reference)


def test_dense_loss_equals_a_plain_reference() -> None:
    """The masked, fixed-shape loss equals the loss over positives picked out by indexing."""
    torch.manual_seed(0)
    points, strides, ranges, boxes, labels = hand_case()
    num_classes = 3
    cls_logits = torch.randn(2, 6, num_classes)
    bbox_reg = torch.rand(2, 6, 4) * 30
    ctr_logits = torch.randn(2, 6, 1)
    targets = [
        {"boxes": boxes, "labels": labels},
        {"boxes": boxes[:1] + 4, "labels": labels[:1]},
    ]
    losses = fcos_loss(cls_logits, bbox_reg, ctr_logits, points, strides, ranges, targets)

    assigned = [assign_targets(points, strides, ranges, t["boxes"], t["labels"]) for t in targets]
    lab = torch.stack([a[0] for a in assigned])
    ltrb = torch.stack([a[1] for a in assigned])
    pos = lab >= 0
    num_pos = pos.sum()
    one_hot = torch.zeros_like(cls_logits)
    one_hot[pos, lab[pos]] = 1
    cls_ref = sigmoid_focal_loss(cls_logits, one_hot, reduction="sum") / num_pos
    pts = points.expand(2, 6, 2)[pos]
    ctr = centerness(ltrb[pos])
    giou = generalized_box_iou_loss(decode(pts, bbox_reg[pos]), decode(pts, ltrb[pos]))
    box_ref = (giou * ctr).sum() / ctr.sum()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(ctr_logits[pos][:, 0], ctr)
    torch.testing.assert_close(losses["loss_cls"], cls_ref)
    torch.testing.assert_close(losses["loss_box"], box_ref)
    torch.testing.assert_close(losses["loss_ctr"], bce)
    torch.testing.assert_close(losses["loss"], cls_ref + box_ref + bce)


def test_loss_without_any_box_is_finite_and_trains_the_classifier() -> None:
    points, strides, ranges, _, _ = hand_case()
    cls_logits = torch.randn(1, 6, 2, requires_grad=True)
    bbox_reg = torch.rand(1, 6, 4, requires_grad=True)
    ctr_logits = torch.randn(1, 6, 1, requires_grad=True)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    losses = fcos_loss(cls_logits, bbox_reg, ctr_logits, points, strides, ranges, empty)
    assert losses["loss_box"] == 0 and losses["loss_ctr"] == 0
    losses["loss"].backward()
    assert torch.isfinite(cls_logits.grad).all() and cls_logits.grad.abs().sum() > 0
    assert torch.isfinite(bbox_reg.grad).all()


def test_loss_needs_one_target_per_image() -> None:
    points, strides, ranges, boxes, labels = hand_case()
    with pytest.raises(ValueError, match="1 targets for a batch of 2"):
        fcos_loss(
            torch.zeros(2, 6, 3),
            torch.zeros(2, 6, 4),
            torch.zeros(2, 6, 1),
            points,
            strides,
            ranges,
            [{"boxes": boxes, "labels": labels}],
        )
