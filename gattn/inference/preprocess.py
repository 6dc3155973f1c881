"""Model input: one path from a decoded image to the float tensor a trained model takes.

Everything that runs a trained model on images (the evaluate stage, the serving app and so
``gattn predict``, ``gattn explain``) makes its inputs here, so the evaluated model is fed
exactly what the served one is fed:

1. the image (a PIL image in the model's mode, an ``(H, W[, C])`` uint8 array or a
   ``(C, H, W)`` uint8 tensor) becomes float32 in ``[0, 1]``, normalised with the model's
   ``mean``/``std`` when it has them (:func:`gattn.data.views.to_float`, the conversion the
   training views end with);
2. when a size is asked for, it is resized by :func:`resize_input`: bilinear,
   ``align_corners=False``, antialiased, as training resizes (torchvision's ``v2.Resize`` and
   ``RandomResizedCrop`` antialias tensors; the tune stage's ``F.interpolate(...,
   antialias=True)``). Without antialiasing, a downscaled input aliases (thin structures
   flicker in and out) in a way the model never saw in training.

The resize runs on floats, after normalisation, and on one image or a batch alike (the
result of an image does not depend on the batch it is in). Decoding files and uploads to an
image of the model's mode happens before this, in the data sets and the serving app's decoder.
Rescaling *outputs* (logits, probabilities) back to an image's size is not input
preprocessing: that stays plain bilinear (:func:`gattn.inference.tta.resize`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from gattn.data.views import to_float

__all__ = ["InputTransform", "model_input", "resize_input"]

Size = tuple[int, int]


def resize_input(x: torch.Tensor, size: Size) -> torch.Tensor:
    """Images ``(B, C, H, W)`` at ``size``: bilinear, ``align_corners=False``, antialiased (a
    no-op, returning ``x`` itself, when they already have that size)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


@functools.lru_cache(maxsize=8)
def _to_float(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> Callable[..., Any]:
    return to_float(mean, std)


def _floats(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def model_input(
    image: Any,
    size: Size | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """The float tensor ``(C, H, W)`` a model takes for one decoded image.

    Args:
        image: A PIL image in the model's mode (``RGB``/``L``), an ``(H, W[, C])`` uint8
            array or a ``(C, H, W)`` uint8 tensor (floats pass through unscaled).
        size: ``(height, width)`` to resize to (:func:`resize_input`); ``None`` keeps the
            image's size.
        mean: Per-channel mean to normalise with (give ``std`` too), or ``None``.
        std: Per-channel standard deviation, or ``None``.

    Returns:
        A plain float32 tensor (no ``tv_tensors`` subclass).
    """
    x = _to_float(_floats(mean), _floats(std))(image).as_subclass(torch.Tensor)
    return x if size is None else resize_input(x[None], size)[0]


class InputTransform:
    """:func:`model_input` as a data set transform: ``t(image)`` for classification samples,
    ``t(image, mask)`` for segmentation ones (the mask resized nearest to the same size, its
    class ids untouched).

    Args:
        size: ``(height, width)`` to resize to, or ``None`` to keep each image's size.
        mean: Per-channel mean to normalise with, or ``None``.
        std: Per-channel standard deviation, or ``None``.
    """

    def __init__(
        self,
        size: Size | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.mean, self.std = _floats(mean), _floats(std)
        _to_float(self.mean, self.std)  # a bad mean/std fails here, not at the first sample

    def __call__(self, image: Any, mask: torch.Tensor | None = None) -> Any:
        x = model_input(image, self.size, self.mean, self.std)
        if mask is None:
            return x
        if self.size is not None and tuple(mask.shape[-2:]) != self.size:
            m = torch.as_tensor(mask).as_subclass(torch.Tensor)
            resized = F.interpolate(m[None, None].float(), size=self.size, mode="nearest")
            mask = resized[0, 0].to(m.dtype)
        return x, mask

    def __repr__(self) -> str:
        return f"InputTransform(size={self.size}, mean={self.mean}, std={self.std})"
