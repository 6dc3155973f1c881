"""Sliding-window inference: exact on pointwise models, full coverage, global feedback."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import nn

from gattn.inference import blend_weights, sliding_window, window_starts
from gattn.inference.sliding_window import (
    MAX_AUTO_BATCH,
    auto_batch_size,
    cache_bytes,
    largest_activation,
    prefers_channels_last,
)

# The module itself (the package exports a function of the same name).
sliding_window_module = importlib.import_module("gattn.inference.sliding_window")


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


# --- Batch size, memory layout and the accumulation, against a plain one-window loop ---------


def conv_model(num_classes: int = 3) -> nn.Module:
    """3x3 convs: a window's output depends on its border, so windows must be placed right."""
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, num_classes, 3, padding=1)
    ).eval()


def plain_weights(h: int, w: int, blend: str) -> torch.Tensor:
    """The gaussian (sigma = size / 8, peak 1, floor 1e-6) written out element by element."""
    if blend == "constant":
        return torch.ones(h, w, dtype=torch.float64)

    def axis(n: int) -> list[float]:
        g = [math.exp(-0.5 * ((i - (n - 1) / 2) / (n / 8)) ** 2) for i in range(n)]
        return [v / max(g) for v in g]

    gy, gx = axis(h), axis(w)
    return torch.tensor([[max(a * b, 1e-6) for b in gx] for a in gy], dtype=torch.float64)


@torch.no_grad()
def plain_loop(
    model: nn.Module, image: torch.Tensor, window: int, overlap: int, blend: str
) -> torch.Tensor:
    """One window per forward in float64 sums; the last window of a row/column is flush with
    the edge; an image smaller than the window is zero-padded and cropped back."""
    B, C, H, W = image.shape
    Hp, Wp = max(H, window), max(W, window)
    padded = torch.zeros(B, C, Hp, Wp)
    padded[:, :, :H, :W] = image
    stride = window - overlap

    def starts(size: int) -> list[int]:
        s = list(range(0, size - window + 1, stride))
        return s if s[-1] == size - window else [*s, size - window]

    weight = plain_weights(window, window, blend)
    total = norm = None
    for b in range(B):
        for y in starts(Hp):
            for x in starts(Wp):
                logits = model(padded[b : b + 1, :, y : y + window, x : x + window]).double()
                if total is None:
                    total = torch.zeros(B, logits.shape[1], Hp, Wp, dtype=torch.float64)
                    norm = torch.zeros(B, 1, Hp, Wp, dtype=torch.float64)
                total[b, :, y : y + window, x : x + window] += logits[0] * weight
                norm[b, :, y : y + window, x : x + window] += weight
    return (total / norm)[..., :H, :W].float()


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("hw", [(70, 90), (64, 64), (20, 45), (32, 32), (10, 20)])
@pytest.mark.parametrize(
    ("batch_size", "channels_last"),
    [("auto", "auto"), (None, False), (1, True), (5, False), (1000, True)],
)
def test_matches_a_plain_one_window_loop(blend, hw, batch_size, channels_last):
    model = conv_model()
    image = torch.rand(2, 3, *hw)
    out = sliding_window(
        model, image, 32, 8, batch_size=batch_size, blend=blend, channels_last=channels_last
    )
    assert out.shape == (2, 3, *hw) and out.dtype == torch.float32
    torch.testing.assert_close(out, plain_loop(model, image, 32, 8, blend), rtol=1e-4, atol=1e-5)


def test_blend_weights_equal_the_written_out_gaussian():
    for h, w in [(32, 32), (15, 9), (256, 128)]:
        expected = plain_weights(h, w, "gaussian").float()
        torch.testing.assert_close(blend_weights((h, w)), expected, rtol=1e-6, atol=1e-12)


class Recorder(nn.Module):
    """A 1x1 conv that records the batch size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.conv(x)


def test_auto_batch_runs_one_window_then_what_fits_the_cache(monkeypatch):
    # 1 MiB of L2, budget 2 MiB; the largest activation of a 32x32 window is the conv's
    # 2-channel output, 8 KiB: 256 windows fit, capped at MAX_AUTO_BATCH (64); the 143 windows
    # left run in 3 equal batches.
    monkeypatch.setattr(sliding_window_module, "cache_bytes", lambda level=2: 1 << 20)
    model = Recorder().eval()
    image = torch.rand(1, 3, 32 + 24 * 11, 32 + 24 * 11)  # 12 x 12 = 144 windows
    sliding_window(model, image, 32, 8)
    assert model.calls == [1, 48, 48, 47]
    # Larger activations, smaller batches: 96x96 windows, 72 KiB outputs -> 28 at most.
    model.calls.clear()
    sliding_window(model, torch.rand(1, 3, 96 + 48 * 4, 96 + 48 * 4), 96, 48)
    assert model.calls == [1, 24]
    model.calls.clear()
    sliding_window(model, torch.rand(1, 3, 96 + 48 * 6, 96 + 48 * 6), 96, 48)  # 49 windows
    assert model.calls == [1, 24, 24]


def test_auto_batch_size_rule(monkeypatch):
    monkeypatch.setattr(sliding_window_module, "cache_bytes", lambda level=2: 2 << 20)
    cpu = torch.device("cpu")
    assert auto_batch_size(1 << 20, 100, cpu) == 4  # 4 MiB budget
    assert auto_batch_size(4 << 20, 100, cpu) == 1
    assert auto_batch_size(16 << 20, 100, cpu) == 1  # never below 1
    assert auto_batch_size(1 << 10, 100, cpu) == MAX_AUTO_BATCH
    assert auto_batch_size(1 << 10, 3, cpu) == 3  # never more than the windows left


def test_auto_batch_size_on_cuda_uses_a_quarter_of_free_memory(monkeypatch):
    # No GPU needed: only the free-memory query is device-specific.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 << 30, 16 << 30))
    cuda = torch.device("cuda")
    assert auto_batch_size(16 << 20, 100, cuda) == 32  # 2 GiB / (4 x 16 MiB)
    assert auto_batch_size(1 << 30, 100, cuda) == 1


def test_largest_activation_sees_every_submodule():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 2, 1)).eval()
    x = torch.rand(1, 3, 20, 30)
    with torch.no_grad():
        out, largest = largest_activation(model, x)
        torch.testing.assert_close(out, model(x))
    assert largest == 16 * 20 * 30 * 4
    assert not any(m._forward_hooks for m in model.modules())  # hooks removed


def test_largest_activation_of_a_model_without_submodules_is_its_input_or_output():
    class Ones(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones(x.shape[0], 5, *x.shape[-2:])

    with torch.no_grad():
        _, largest = largest_activation(Ones(), torch.rand(1, 3, 20, 30))
    assert largest == 5 * 20 * 30 * 4


def test_cache_bytes_is_a_positive_size():
    assert cache_bytes() > 0


def test_channels_last_auto_picks_conv_models_on_cpu():
    cpu = torch.device("cpu")
    assert prefers_channels_last(conv_model(), cpu)
    assert not prefers_channels_last(nn.Sequential(nn.Flatten(), nn.Linear(3, 3)), cpu)


def test_output_is_contiguous_nchw_after_channels_last_windows():
    out = sliding_window(conv_model(), torch.rand(1, 3, 64, 80), 32, 8, channels_last=True)
    assert out.is_contiguous()


def test_half_precision_logits_are_accumulated_in_float32():
    class Half(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :2].half()

    image = torch.rand(1, 3, 40, 50)
    out = sliding_window(Half(), image, 16, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, image[:, :2].half().float())


def test_bad_batch_size_is_refused():
    for bad in (0, -1, "big", 2.5):
        with pytest.raises(ValueError, match="batch_size"):
            sliding_window(conv_model(), torch.rand(1, 3, 40, 40), 16, 4, batch_size=bad)


def test_constant_blending_equals_monai():
    """Optional reference (``pip install .[bench]``): MONAI's sliding_window_inference."""
    inferers = pytest.importorskip("monai.inferers")
    model = conv_model()
    image = torch.rand(2, 3, 70, 90)
    with torch.no_grad():
        expected = inferers.sliding_window_inference(
            image, 32, 4, model, overlap=8 / 32, mode="constant"
        )
    out = sliding_window(model, image, 32, 8, blend="constant")
    torch.testing.assert_close(out, torch.as_tensor(expected), rtol=1e-5, atol=1e-5)
