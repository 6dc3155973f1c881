"""Test-time augmentation: multi-scale and horizontal-flip views, merged as probabilities.

Multi-scale + flip inference as in DeepLab (Chen et al. 2018, "Encoder-Decoder with Atrous
Separable Convolution for Semantic Image Segmentation", Sec. 4) and mmsegmentation's
``aug_test``: the model runs on the image resized by each scale, with and without a
horizontal flip; segmentation maps are flipped back and resized to the input size, and the
softmax probabilities (not raw logits, whose scale differs between views) are averaged.

Per scale, the image and its flip are stacked into one batch, so a scale costs one forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Task = Literal["seg", "cls"]

_LINEAR_MODES = ("linear", "bilinear", "bicubic", "trilinear")


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """``F.interpolate`` to ``size``, ``align_corners=False`` for the linear modes; a no-op
    when ``x`` already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    align = False if mode in _LINEAR_MODES else None
    return F.interpolate(x, size=size, mode=mode, align_corners=align)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size`` times ``scale``, rounded, at least 1 pixel per axis."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


@torch.no_grad()
def tta(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    scales: Sequence[float] = (0.75, 1.0, 1.25),
    flip: bool = True,
    task: Task = "seg",
    *,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Averaged softmax probabilities of ``model`` over scaled and flipped views of ``image``.

    Args:
        model: Returns logits ``(n, K, h, w)`` (``task="seg"``) or ``(n, K)`` (``"cls"``).
            Put it in eval mode first; gradients are not tracked.
        image: Images ``(B, C, H, W)``.
        scales: Resize factors of the views (1.0 is the image itself).
        flip: Add the horizontal flip of every scaled view.
        task: ``"seg"`` or ``"cls"``.
        mode: Interpolation of the images and of the probability maps.

    Returns:
        Probabilities, ``(B, K, H, W)`` for ``"seg"`` (at the input size), ``(B, K)`` for
        ``"cls"``; they sum to one over ``K``. Take ``argmax(1)`` for labels.
    """
    if task not in ("seg", "cls"):
        raise ValueError(f"task must be 'seg' or 'cls', got {task!r}")
    if not scales:
        raise ValueError("tta needs at least one scale")
    B = image.shape[0]
    size = (image.shape[-2], image.shape[-1])
    total: torch.Tensor | None = None
    for scale in scales:
        view = resize(image, scaled_size(size, scale), mode)
        batch = torch.cat([view, view.flip(-1)]) if flip else view
        probs = model(batch).float().softmax(dim=1)
        if task == "seg":
            if flip:
                probs = torch.cat([probs[:B], probs[B:].flip(-1)])
            probs = resize(probs, size, mode)
        merged = probs.view(-1, B, *probs.shape[1:]).sum(0)
        total = merged if total is None else total + merged
    assert total is not None
    return total / (len(scales) * (2 if flip else 1))
