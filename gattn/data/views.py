"""Training views: multi-scale global + local views, DINO multi-crop, MAE input, joint seg and
detection views.

Thin builders over ``torchvision.transforms.v2``, which already applies one random geometry to
every tv_tensor of a call and resizes ``tv_tensors.Mask`` with nearest interpolation, so
segmentation image and mask stay aligned (and moves ``tv_tensors.BoundingBoxes`` with the
image: detection boxes are rescaled, cropped and flipped with it).

References:
    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO multi-crop),
    ICCV 2021. He et al., "Masked Autoencoders Are Scalable Vision Learners" (MAE), CVPR 2022.

The article's ``MultiScaleAugmentation`` took ``RandomCrop(int(224 * scale))`` of the raw image,
which fails whenever the crop is larger than the image; here a local scale is a fraction of the
image side, so every scale is valid for any image size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

__all__ = [
    "MultiCropViews",
    "MultiScaleViews",
    "det_train_transform",
    "mae_view",
    "seg_eval_transform",
    "seg_train_transform",
    "to_float",
]

Floats = Sequence[float]


def _check_range(name: str, value: tuple[float, float], high: float = 1.0) -> None:
    lo, hi = value
    if not 0.0 < lo <= hi <= high:
        raise ValueError(f"{name}={value!r} is invalid, expected 0 < low <= high <= {high}")


def to_float(mean: Floats | None = None, std: Floats | None = None) -> v2.Transform:
    """PIL/tensor image to a float ``tv_tensors.Image`` in [0, 1] (then ``Normalize`` if given);
    masks pass through untouched."""
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
    ]
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ValueError("give both mean and std, or neither")
        steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def _crop_view(
    size: int,
    scale: tuple[float, float],
    flip: bool,
    color_jitter: float,
    mean: Floats | None,
    std: Floats | None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> v2.Compose:
    steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=scale, ratio=ratio)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        j = color_jitter
        steps += [
            v2.RandomApply([v2.ColorJitter(j, j, j / 2, j / 4)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    return v2.Compose([*steps, to_float(mean, std)])


class MultiCropViews:
    """DINO multi-crop: ``n_global`` large crops and ``n_local`` small crops of one image.

    Args:
        global_size: output side of a global crop.
        local_size: output side of a local crop.
        n_local: number of local crops.
        global_scale: area fraction range of a global crop.
        local_scale: area fraction range of a local crop.
        n_global: number of global crops (2 in DINO).
        flip: random horizontal flip.
        color_jitter: colour-jitter strength (0 disables jitter and random greyscale).
        mean: per-channel mean for ``Normalize`` (``None``: no normalisation).
        std: per-channel std for ``Normalize``.

    Returns (call):
        ``(global_views, local_views)``: two lists of float tensors.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        n_global: int = 2,
        flip: bool = True,
        color_jitter: float = 0.4,
        mean: Floats | None = None,
        std: Floats | None = None,
    ) -> None:
        _check_range("global_scale", global_scale)
        _check_range("local_scale", local_scale)
        if n_global < 1 or n_local < 0:
            raise ValueError(f"n_global={n_global} must be >= 1 and n_local={n_local} >= 0")
        self.n_global, self.n_local = n_global, n_local
        self.global_view = _crop_view(global_size, global_scale, flip, color_jitter, mean, std)
        self.local_view = _crop_view(local_size, local_scale, flip, color_jitter, mean, std)

    def __call__(self, image: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return (
            [self.global_view(image) for _ in range(self.n_global)],
            [self.local_view(image) for _ in range(self.n_local)],
        )


class MultiScaleViews:
    """The whole image as one global view, plus one random square local crop per scale.

    Args:
        global_size: side the whole image is resized to.
        local_size: side every local crop is resized to.
        scales: side of each local crop as a fraction of the image side, in (0, 1].
        flip: random horizontal flip of the local crops.
        mean: per-channel mean for ``Normalize`` (``None``: no normalisation).
        std: per-channel std for ``Normalize``.

    Returns (call):
        ``(global_view, local_views)``: a float tensor and a list of ``len(scales)`` of them.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        scales: Floats = (0.25, 0.5, 0.75),
        flip: bool = False,
        mean: Floats | None = None,
        std: Floats | None = None,
    ) -> None:
        for s in scales:
            _check_range("scales", (s, s))
        self.global_view = v2.Compose([v2.Resize((global_size, global_size)), to_float(mean, std)])
        self.local_views = [
            _crop_view(local_size, (s * s, s * s), flip, 0.0, mean, std, ratio=(1.0, 1.0))
            for s in scales
        ]

    def __call__(self, image: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.global_view(image), [view(image) for view in self.local_views]


def mae_view(
    size: int = 224,
    scale: tuple[float, float] = (0.2, 1.0),
    flip: bool = True,
    mean: Floats | None = None,
    std: Floats | None = None,
) -> v2.Compose:
    """MAE pre-training input: one random resized crop (bicubic) and a horizontal flip."""
    _check_range("scale", scale)
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC)
    ]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose([*steps, to_float(mean, std)])


def seg_train_transform(
    size: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    vflip: bool = False,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    mean: Floats | None = None,
    std: Floats | None = None,
) -> v2.Compose:
    """Joint training view, called as ``t(image, mask)``: random resized crop and flips.

    ``interpolation`` applies to the image; the ``tv_tensors.Mask`` is always resized nearest.
    """
    _check_range("scale", scale)
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interpolation)
    ]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    return v2.Compose([*steps, to_float(mean, std)])


def seg_eval_transform(
    size: int | None = None, mean: Floats | None = None, std: Floats | None = None
) -> v2.Compose:
    """Joint evaluation view of segmentation or detection: optional resize to ``size`` x
    ``size`` (a mask nearest, boxes rescaled), to float."""
    steps: list[v2.Transform] = [] if size is None else [v2.Resize((size, size))]
    return v2.Compose([*steps, to_float(mean, std)])


def det_train_transform(
    size: int,
    scale: tuple[float, float] = (1.0, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    interpolation: InterpolationMode = InterpolationMode.BILINEAR,
    mean: Floats | None = None,
    std: Floats | None = None,
) -> v2.Compose:
    """Joint detection training view, called as ``t(image, target)``: a random resized crop of
    ``scale`` of the area (``(1, 1)``, the default: the whole image resized, so a distant cue
    stays in view), a horizontal flip (boxes flipped too), to float. Boxes are clipped to the
    crop, and those left under 1 px wide or high are dropped with their labels."""
    _check_range("scale", scale)
    crop: v2.Transform = (
        v2.Resize((size, size), interpolation=interpolation)
        if scale == (1.0, 1.0)
        else v2.RandomResizedCrop(size, scale=scale, ratio=ratio, interpolation=interpolation)
    )
    steps: list[v2.Transform] = [crop]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(
        [
            *steps,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0),
            to_float(mean, std),
        ]
    )
