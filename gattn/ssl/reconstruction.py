"""MAE reconstructions as images and as a PNG figure: input | masked | reconstruction.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, Figure 2: the
masked input with masked patches grey, and the reconstruction with the visible patches
pasted back from the input (the loss never asks the decoder to predict them, so its output
there is meaningless). With ``norm_pix_loss`` the prediction is in per-patch standardised
units and is mapped back with the input patches' own mean and standard deviation.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gattn.data.synthetic import atomic_write

from .mae import normalize_patches, patchify, unpatchify

__all__ = ["reconstruct", "reconstruction_figure"]

MASK_GREY = 0.5


def _patch_size(imgs: torch.Tensor, pred: torch.Tensor) -> int:
    """The square patch side implied by ``pred``'s last dimension and the image channels."""
    side = math.isqrt(pred.shape[-1] // imgs.shape[1])
    if side * side * imgs.shape[1] != pred.shape[-1]:
        raise ValueError(
            f"prediction width {pred.shape[-1]} is not a square patch of {imgs.shape[1]} channels"
        )
    return side


@torch.no_grad()
def reconstruct(
    imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel-space images for display, in the input's units.

    Args:
        imgs: Input images ``(B, C, H, W)``.
        pred: Predicted patches ``(B, N, p * p * C)`` (square patches).
        mask: ``(B, N)``, 1 for masked patches.
        norm_pix_loss: ``pred`` is in per-patch standardised units.

    Returns:
        ``(pixel_mask, prediction, reconstruction)``: the mask as ``(B, 1, H, W)``, the raw
        prediction as images, and the prediction on masked patches with the input elsewhere.
    """
    p = _patch_size(imgs, pred)
    b, c, h, w = imgs.shape
    grid = (h // p, w // p)
    if norm_pix_loss:
        _, mean, std = normalize_patches(patchify(imgs, p))
        pred = pred * std + mean
    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, p * p).to(imgs.dtype), p, grid, 1)
    prediction = unpatchify(pred.to(imgs.dtype), p, grid, c)
    return pixel_mask, prediction, torch.lerp(imgs, prediction, pixel_mask)


def _to_display(
    x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """``(B, C, H, W)`` in normalised units to ``(B, H, W, C)`` floats in [0, 1] for imshow."""
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        shape = (1, -1, 1, 1)
        x = x * torch.tensor(std).reshape(shape) + torch.tensor(mean).reshape(shape)
    return x.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


def reconstruction_figure(
    imgs: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    path: str | os.PathLike[str],
    norm_pix_loss: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    max_images: int = 8,
    dpi: int = 100,
) -> Path:
    """Write a PNG with one row per image: input | masked | reconstruction.

    The file is rendered in memory and moved into place atomically (temporary file and
    ``os.replace``), so a reader never sees a partial PNG.

    Args:
        imgs: Input images ``(B, C, H, W)`` (``C`` is 1 or 3).
        pred: :class:`~gattn.ssl.mae.MaskedAutoencoder` prediction ``(B, N, p * p * C)``.
        mask: Its mask ``(B, N)``, 1 = masked.
        path: Output ``.png`` path; the parent folder must exist.
        norm_pix_loss: The model was trained with ``norm_pix_loss``.
        mean: Per-channel mean the images were normalised with (``None``: images in [0, 1]).
        std: Per-channel std the images were normalised with.
        max_images: At most this many rows (the first images of the batch).
        dpi: Resolution of the figure.

    Returns:
        The written path.
    """
    n = min(max_images, imgs.shape[0])
    imgs, pred, mask = imgs[:n], pred[:n], mask[:n]
    pixel_mask, _, recon = reconstruct(imgs, pred, mask, norm_pix_loss)
    shown = _to_display(imgs, mean, std)
    hidden = pixel_mask.permute(0, 2, 3, 1).float().cpu().numpy()
    columns = {
        "input": shown,
        "masked": shown * (1 - hidden) + MASK_GREY * hidden,
        "reconstruction": _to_display(recon, mean, std),
    }
    fig = Figure(figsize=(2.0 * len(columns), 2.0 * n), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, len(columns), squeeze=False)
    for row in range(n):
        for col, (title, images) in enumerate(columns.items()):
            ax = axes[row][col]
            image = images[row]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write(path, buf.getvalue())
    return path
