"""Box-level sliding window and TTA: exact on an equivariant detector, boxes land in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gattn.inference import downscaled_context, sliding_window_detect, tta_detect
from gattn.inference.detection import cut_by_window
from gattn.models import build_model
from gattn.models.fcos import Target


class PeakDetector(nn.Module):
    """Every pixel of channel 0 above 0.5 is a 3x3 object around it (score: the pixel's
    value, class: channel 1 > 0). Exactly translation- and flip-equivariant; counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, ...]] = []

    def predict(
        self,
        images: torch.Tensor,
        *,
        score_thresh: float = 0.05,
        nms_iou: float = 0.6,
        max_det: int = 100,
        global_context: torch.Tensor | None = None,
    ) -> list[Target]:
        self.calls.append(tuple(images.shape))
        results = []
        for image in images:
            ys, xs = torch.nonzero(image[0] > 0.5, as_tuple=True)
            boxes = torch.stack([xs - 1, ys - 1, xs + 2, ys + 2], 1).float()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.shape[-1])
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.shape[-2])
            scores = image[0, ys, xs]
            order = scores.argsort(descending=True)[:max_det]
            labels = (image[1, ys, xs] > 0).long()
            results.append(
                {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}
            )
        return results


def peaks(b: int, h: int, w: int, points: list[tuple[int, int]]) -> torch.Tensor:
    image = torch.zeros(b, 3, h, w)
    for k, (y, x) in enumerate(points):
        image[:, 0, y, x] = 0.6 + 0.01 * k  # distinct scores
        image[:, 1, y, x] = k % 2
    return image


def as_set(r: Target) -> set[tuple[float, ...]]:
    return {(*b.tolist(), round(s.item(), 4), int(c)) for b, s, c in zip(*r.values(), strict=True)}


# Peaks inside windows, on window edges (x = 31, 32 with 32-pixel windows), in overlaps and
# near the image border.
POINTS = [(5, 5), (10, 31), (20, 32), (40, 45), (50, 70), (66, 3), (30, 56), (1, 78)]


@pytest.mark.parametrize(("window", "overlap"), [(32, 8), ((24, 40), (6, 10)), (16, 4)])
def test_windows_reproduce_the_whole_image(window, overlap) -> None:
    model = PeakDetector()
    image = peaks(2, 70, 80, POINTS)
    whole = model.predict(image)
    out = sliding_window_detect(model, image, window, overlap, batch_size=5)
    assert len(out) == 2
    for got, ref in zip(out, whole, strict=True):
        assert as_set(got) == as_set(ref) and len(got["boxes"]) == len(POINTS)
        assert (got["scores"].diff() <= 0).all()
    assert all(shape[0] <= 5 for shape in model.calls)


def test_a_window_at_an_offset_puts_its_box_in_place() -> None:
    model = PeakDetector()
    image = peaks(1, 64, 64, [(50, 45)])
    (out,) = sliding_window_detect(model, image, 32, 0)
    assert out["boxes"].tolist() == [[44.0, 49.0, 47.0, 52.0]]  # found by the window at (32, 32)
    assert len(model.calls) == 1 and model.calls[0] == (4, 3, 32, 32)


def test_an_image_smaller_than_the_window_is_padded_and_clipped() -> None:
    model = PeakDetector()
    (out,) = sliding_window_detect(model, peaks(1, 20, 12, [(19, 11)]), 32, 8)
    assert out["boxes"].tolist() == [[10.0, 18.0, 12.0, 20.0]]


def test_cut_boxes_are_those_at_inner_window_edges() -> None:
    boxes = torch.tensor([[0.0, 5, 4, 9], [5, 5, 9, 9], [28, 0, 32, 4]])
    assert cut_by_window(boxes, (0, 0, 32, 32), (64, 64)).tolist() == [False, False, True]
    assert cut_by_window(boxes, (32, 32, 32, 32), (64, 64)).tolist() == [True, False, True]
    assert cut_by_window(boxes, (0, 32, 32, 32), (64, 64)).tolist() == [True, False, False]


def tiny_detector() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        {
            "task": "det",
            "backbone": "resnet18",
            "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]},
            "num_classes": 2,
            "min_level": 2,
            "fpn_channels": 16,
            "head_kwargs": {"num_convs": 1},
        }
    ).eval()


def test_one_window_over_the_whole_image_equals_predict() -> None:
    model = tiny_detector()
    image = torch.rand(2, 3, 64, 64)
    out = sliding_window_detect(model, image, 64, 16, score_thresh=0.01)
    for got, ref in zip(out, model.predict(image, score_thresh=0.01), strict=True):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], ref[key])


def test_windows_get_the_whole_image_context() -> None:
    model = tiny_detector()
    torch.nn.init.normal_(model.context_proj.weight, std=3.0)
    image = torch.rand(1, 3, 96, 96)
    plain = sliding_window_detect(model, image, 64, 32, score_thresh=0.0, max_det=5)
    fed = sliding_window_detect(
        model, image, 64, 32, global_context="auto", score_thresh=0.0, max_det=5
    )
    assert fed[0]["boxes"].shape == (5, 4)
    assert not torch.allclose(fed[0]["scores"], plain[0]["scores"])
    given = sliding_window_detect(
        model, image, 64, 32, global_context=downscaled_context(model, image, 64), score_thresh=0.0
    )
    torch.testing.assert_close(given[0]["scores"][:5], fed[0]["scores"])


def test_flip_tta_of_an_equivariant_detector_returns_its_boxes() -> None:
    model = PeakDetector()
    image = peaks(2, 30, 41, [(5, 7), (20, 33), (12, 20)])
    (ref, _) = model.predict(image)
    for got in tta_detect(model, image, scales=(1.0,), flip=True):
        assert as_set(got) == as_set(ref)
    assert model.calls[-1] == (4, 3, 30, 41)  # image and flip in one batch


def test_scaled_views_map_back_to_the_input() -> None:
    """A detector that finds one box over its whole input: every view maps back to the
    input's full box."""

    class WholeImage(PeakDetector):
        def predict(self, images: torch.Tensor, **kwargs: object) -> list[Target]:
            h, w = images.shape[-2:]
            one = {
                "boxes": torch.tensor([[0.0, 0.0, w, h]]),
                "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1]),
            }
            return [one] * len(images)

    (out,) = tta_detect(WholeImage(), torch.rand(1, 3, 40, 60), scales=(0.5, 1.0, 1.5))
    assert out["boxes"].tolist() == [[0.0, 0.0, 60.0, 40.0]]


def test_tta_on_a_real_detector() -> None:
    model = tiny_detector()
    out = tta_detect(model, torch.rand(2, 3, 48, 64), score_thresh=0.01, max_det=10)
    assert len(out) == 2 and all(0 < len(r["boxes"]) <= 10 for r in out)
    assert all((r["boxes"][:, 2] <= 64).all() and (r["boxes"][:, 3] <= 48).all() for r in out)


def test_resized_detect_scales_boxes_back_and_box_runner_feeds_tta() -> None:
    from gattn.inference import BoxRunner, resized_detect

    model = PeakDetector()
    image = torch.zeros(1, 3, 64, 48)
    image[0, 0, 20:24, 16:20] = 0.9  # a 4x4 blob: it survives the 2x downscale as a peak
    (small,) = resized_detect(model, image, (32, 24))
    assert model.calls[-1] == (1, 3, 32, 24)
    (direct,) = model.predict(torch.nn.functional.interpolate(image, (32, 24), mode="bilinear",
                                                              antialias=True))  # fmt: skip
    torch.testing.assert_close(small["boxes"], direct["boxes"] * 2)
    assert resized_detect(model, image, (64, 48))[0]["boxes"].shape == (16, 4)  # itself

    runner = BoxRunner(lambda x, **kw: resized_detect(model, x, (32, 24), **kw))
    (found,) = tta_detect(runner, image, scales=(1.0,), flip=True, max_det=2)
    assert len(found["boxes"]) <= 2 and (found["boxes"][:, 2] <= 48).all()
    with pytest.raises(ValueError, match="global_context"):
        runner.predict(image, global_context=torch.zeros(1, 4))
