"""Sliding-window inference for images larger than the model's input, with global feedback.

Tiling with overlapping windows and importance-weighted blending as in MONAI's
``sliding_window_inference`` and nnU-Net (Isensee et al. 2021, "nnU-Net: a self-configuring
method for deep learning-based biomedical image segmentation"): a gaussian weight with
``sigma = window / 8`` favours each window's centre, where it sees the most context, and the
blended logits are divided by the summed weights.

Unlike the source article's ``SlidingWindowInference``: the output has the model's ``K``
channels (not the image's), the last window of a row/column is flush with the right/bottom
edge (so every pixel is covered for any size, including sizes that are not a multiple of the
stride and images smaller than the window, which are padded and cropped back), windows run
``batch_size`` at a time, and blending can be gaussian.

Global-context feedback: a window cannot see a cue outside itself. For models that accept a
``global_context`` (:class:`~gattn.models.segmenter.Segmenter`), ``global_context="auto"``
runs one pass over the whole image downscaled to ``context_size`` through
``model.encode_context`` and gives that per-image vector to every window.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Blend = Literal["gaussian", "constant"]
Size = int | tuple[int, int]

GAUSSIAN_SIGMA_SCALE = 0.125  # sigma = window / 8 (MONAI's default, nnU-Net)
_MIN_WEIGHT = 1e-6  # floor of the gaussian, so that no covered pixel has a zero weight


def _pair(value: Size) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels along an axis of ``size`` pixels.

    Windows are ``stride`` apart and the last one ends exactly at ``size`` (it may overlap its
    neighbour more than the others do), so every pixel is covered. A ``size <= window`` axis
    gets one window at 0.

    Args:
        size: Length of the axis.
        window: Window length.
        stride: Distance between window starts, ``1 <= stride <= window``.
    """
    if window <= 0 or not 0 < stride <= window:
        raise ValueError(f"need window > 0 and 0 < stride <= window, got {window=}, {stride=}")
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def blend_weights(
    window: Size,
    blend: Blend = "gaussian",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-pixel blending weight ``(h, w)`` of one window, maximum 1.

    Args:
        window: Window size ``(h, w)`` or an int.
        blend: ``"gaussian"`` (``sigma = GAUSSIAN_SIGMA_SCALE * size`` per axis, floored at a
            small positive value) or ``"constant"`` (all ones).
        device: Device of the weights.
        dtype: Dtype of the weights.
    """
    h, w = _pair(window)
    if blend == "constant":
        return torch.ones(h, w, device=device, dtype=dtype)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, device=device, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (GAUSSIAN_SIGMA_SCALE * n)) ** 2)

    weight = torch.outer(axis(h), axis(w))
    return (weight / weight.max()).clamp_min(_MIN_WEIGHT).to(dtype)


def downscaled_context(model: nn.Module, image: torch.Tensor, context_size: Size) -> torch.Tensor:
    """``model.encode_context`` of ``image`` resized (antialiased bilinear) to ``context_size``."""
    if not callable(getattr(model, "encode_context", None)):
        raise TypeError(
            f"global_context='auto' needs a model with encode_context(x), not {type(model)}"
        )
    small = F.interpolate(
        image, size=_pair(context_size), mode="bilinear", align_corners=False, antialias=True
    )
    return model.encode_context(small)


@torch.no_grad()
def sliding_window(
    model: nn.Module,
    image: torch.Tensor,
    window: Size,
    overlap: Size,
    batch_size: int = 8,
    blend: Blend = "gaussian",
    global_context: torch.Tensor | Literal["auto"] | None = None,
    *,
    context_size: Size | None = None,
    pad_value: float = 0.0,
    channels_last: bool = False,
) -> torch.Tensor:
    """Blended logits ``(B, K, H, W)`` of ``model`` run on overlapping windows of ``image``.

    The model is called as ``model(windows)`` or, when a context is given,
    ``model(windows, global_context=context)`` with ``windows`` ``(n, C, h, w)`` and
    ``context`` ``(n, C_g)`` (each window gets its own image's vector). It must return logits
    ``(n, K, h', w')``; maps smaller than the window (a stride > 1 head) are resized
    bilinearly to the window. Put the model in eval mode first; gradients are not tracked.

    Args:
        model: Segmentation model.
        image: Images ``(B, C, H, W)``, any ``H, W``.
        window: Window size in pixels, ``(h, w)`` or an int.
        overlap: Overlap of neighbouring windows in pixels (stride = window - overlap).
        batch_size: Windows per forward pass (windows of all images are batched together).
        blend: ``"gaussian"`` or ``"constant"`` weights, see :func:`blend_weights`.
        global_context: ``None`` (no feedback), a ``(B, C_g)`` tensor given to every window of
            its image, or ``"auto"``: :func:`downscaled_context` of the whole image.
        context_size: Size of the downscaled image for ``"auto"``; defaults to ``window``
            (the resolution the model was trained at).
        pad_value: Value that pads axes shorter than the window (cropped off the output).
        channels_last: Run the windows in ``torch.channels_last`` memory format.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    win, ovl = _pair(window), _pair(overlap)
    strides = tuple(w - o for w, o in zip(win, ovl, strict=True))
    B, _, H, W = image.shape

    if isinstance(global_context, str):
        if global_context != "auto":
            raise ValueError(f"global_context must be None, a tensor or 'auto': {global_context!r}")
        global_context = downscaled_context(model, image, context_size or win)
    if global_context is not None and global_context.shape[0] != B:
        raise ValueError(f"global_context has {global_context.shape[0]} rows for {B} images")

    # Pad axes shorter than the window at the bottom/right; cropped back at the end.
    pad_h, pad_w = max(win[0] - H, 0), max(win[1] - W, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h), value=pad_value)
    Hp, Wp = image.shape[-2:]

    ys = window_starts(Hp, win[0], strides[0])
    xs = window_starts(Wp, win[1], strides[1])
    crops = [(b, y, x) for b in range(B) for y in ys for x in xs]
    weight = blend_weights(win, blend, device=image.device)

    norm = torch.zeros(Hp, Wp, device=image.device)
    for y in ys:
        for x in xs:
            norm[y : y + win[0], x : x + win[1]] += weight

    out: torch.Tensor | None = None
    for i in range(0, len(crops), batch_size):
        chunk = crops[i : i + batch_size]
        windows = torch.stack([image[b, :, y : y + win[0], x : x + win[1]] for b, y, x in chunk])
        if channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last)
        if global_context is None:
            logits = model(windows)
        else:
            ctx = global_context[torch.tensor([b for b, _, _ in chunk], device=image.device)]
            logits = model(windows, global_context=ctx)
        if logits.shape[-2:] != win:
            logits = F.interpolate(logits, size=win, mode="bilinear", align_corners=False)
        if out is None:
            out = torch.zeros(B, logits.shape[1], Hp, Wp, device=image.device)
        logits = logits.float() * weight
        for (b, y, x), tile in zip(chunk, logits, strict=True):
            out[b, :, y : y + win[0], x : x + win[1]] += tile
    assert out is not None  # at least one window per image
    return (out / norm)[..., :H, :W]
