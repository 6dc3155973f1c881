"""Sliding-window inference: exact on pointwise models, full coverage, global feedback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gattn.inference import blend_weights, sliding_window, window_starts


def pointwise_model(in_chans: int = 3, num_classes: int = 5) -> nn.Module:
    """1x1 convs only: a window's output equals the whole image's output on its pixels."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(in_chans, 8, 1), nn.GELU(), nn.Conv2d(8, num_classes, 1)).eval()


@pytest.mark.parametrize(
    ("size", "window", "stride"),
    [(53, 16, 11), (37, 16, 11), (16, 16, 4), (10, 16, 8), (100, 7, 7), (21, 8, 1)],
)
def test_window_starts_cover_every_pixel_and_stay_inside(size, window, stride):
    starts = window_starts(size, window, stride)
    covered = torch.zeros(max(size, window), dtype=torch.bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered[:size].all()
    assert starts[0] == 0 and starts[-1] + window == max(size, window)
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert all(0 < g <= stride for g in gaps)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize(
    ("hw", "window", "overlap"),
    [((37, 53), 16, 5), ((9, 12), 16, 4), ((20, 7), (8, 12), (3, 2)), ((32, 32), 16, 0)],
)
def test_pointwise_model_matches_whole_image(blend, hw, window, overlap):
    model = pointwise_model()
    image = torch.randn(2, 3, *hw)
    out = sliding_window(model, image, window, overlap, batch_size=3, blend=blend)
    with torch.no_grad():
        expected = model(image)
    assert out.shape == (2, 5, *hw)  # the model's K channels, not the image's 3
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_batch_size_does_not_change_the_result():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    image = torch.randn(2, 3, 29, 41)
    ref = sliding_window(model.eval(), image, 12, 4, batch_size=1)
    for bs in (2, 7, 1000):
        torch.testing.assert_close(sliding_window(model, image, 12, 4, batch_size=bs), ref)


def test_blend_normalisation_every_pixel_gets_unit_weight():
    """A model that outputs ones everywhere gives exactly ones: the weights are normalised."""

    class Ones(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones(x.shape[0], 2, *x.shape[-2:])

    for blend in ("gaussian", "constant"):
        out = sliding_window(Ones(), torch.zeros(1, 1, 45, 31), 13, 6, blend=blend)
        torch.testing.assert_close(out, torch.ones(1, 2, 45, 31))


def test_gaussian_weights_peak_at_centre():
    w = blend_weights((15, 9))
    assert w.shape == (15, 9) and w.max() == 1.0 and w.min() > 0
    assert w[7, 4] == w.max()
    assert w[0, 0] < w[3, 2] < w[7, 4]
    torch.testing.assert_close(w, w.flip(0).flip(1))


class CueModel(nn.Module):
    """Channel 0 marks shapes, channel 1 holds a cue (+1 or -1) in a corner of the image.

    Shapes are class 1 when the image's cue is positive and class 2 when negative; the
    background is class 0. The decision uses ``global_context`` (the cue's mean) when given,
    else the window's own cue mean, which is 0 away from the cue: a tie that argmax breaks
    toward class 1.
    """

    def encode_context(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1].mean(dim=(1, 2)).unsqueeze(1)

    def forward(self, x: torch.Tensor, global_context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self.encode_context(x) if global_context is None else global_context
        sign = torch.tanh(1e3 * ctx)[:, :, None, None]
        shape = x[:, :1]
        return torch.cat([0.5 - shape, shape * sign, -shape * sign], dim=1)


def cue_image(sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, 2, 48, 64)
    x[:, 1, :6, :6] = sign  # cue in the top-left corner
    target = torch.zeros(48, 64, dtype=torch.long)
    for y, xx in [(30, 50), (10, 40), (36, 8)]:
        x[:, 0, y : y + 6, xx : xx + 6] = 1
        target[y : y + 6, xx : xx + 6] = 1 if sign > 0 else 2
    return x, target


def test_global_feedback_fixes_windows_that_cannot_see_the_cue():
    model = CueModel()
    x, target = cue_image(-1.0)
    plain = sliding_window(model, x, 16, 4).argmax(1)[0]
    assert (plain != target).any()  # shapes far from the cue are mislabelled
    fed = sliding_window(model, x, 16, 4, global_context="auto").argmax(1)[0]
    assert torch.equal(fed, target)
    # An explicit context tensor works the same way, and so does the positive cue.
    fed = sliding_window(model, x, 16, 4, global_context=torch.tensor([[-1.0]]))
    assert torch.equal(fed.argmax(1)[0], target)
    x, target = cue_image(1.0)
    assert torch.equal(sliding_window(model, x, 16, 4, global_context="auto").argmax(1)[0], target)


def test_context_rows_follow_their_image():
    model = CueModel()
    (xn, tn), (xp, tp) = cue_image(-1.0), cue_image(1.0)
    out = sliding_window(model, torch.cat([xn, xp]), 16, 4, batch_size=5, global_context="auto")
    assert torch.equal(out.argmax(1), torch.stack([tn, tp]))


def test_auto_context_needs_encode_context():
    with pytest.raises(TypeError, match="encode_context"):
        sliding_window(pointwise_model(), torch.zeros(1, 3, 20, 20), 8, 2, global_context="auto")


def test_segmenter_with_auto_context_runs_at_any_size():
    from gattn.models.build import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter(backbone="gattn_local_cnn", num_classes=3, in_chans=1).eval()
    out = sliding_window(model, torch.randn(1, 1, 45, 70), 32, 8, global_context="auto")
    assert out.shape == (1, 3, 45, 70) and torch.isfinite(out).all()


def test_channels_last_and_batching_leave_a_segmenter_output_unchanged():
    """The memory-format switch the benchmark measures changes speed, not results."""
    from gattn.models.build import build_segmenter

    torch.manual_seed(0)
    model = build_segmenter(backbone="gattn_local_cnn", num_classes=3).eval()
    image = torch.rand(1, 3, 50, 70)
    ref = sliding_window(model, image, 32, 8, batch_size=1)
    fast = sliding_window(model, image, 32, 8, batch_size=4, channels_last=True)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
