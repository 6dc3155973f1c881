"""Effective receptive field: which input pixels actually move the centre output.

Paper: Luo, Li, Urtasun, Zemel 2016, "Understanding the Effective Receptive Field in Deep
Convolutional Neural Networks" (NeurIPS), https://arxiv.org/abs/1701.04128. The gradient of
the centre output unit w.r.t. the input, in absolute value and accumulated over images, is the
ERF map. As in RepLKNet (Ding et al. 2022, "Scaling Up Your Kernels to 31x31"), the map is
summarised by the fraction of the input area that holds 20/50/99% of the total contribution:
a local CNN needs a small patch around the centre, a global model spreads over the image.
This is the project's "how global is this model" number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DEFAULT_THRESHOLDS = (0.2, 0.5, 0.99)


@dataclass(frozen=True)
class ReceptiveField:
    """Effective receptive field of a model.

    Attributes:
        map: ``(H, W)`` summed absolute input gradient of the centre output.
        area_ratios: ``{threshold: fraction of input pixels}``: the smallest set of pixels
            (taken by decreasing contribution) holding ``threshold`` of the total.
        num_images: Images the map was accumulated over.
    """

    map: torch.Tensor
    area_ratios: dict[float, float]
    num_images: int


def area_ratios(
    contribution: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict[float, float]:
    """Fraction of the entries of a non-negative map needed to hold each share of its sum.

    Entries are sorted by decreasing value and accumulated; for threshold ``t`` the count is
    the first prefix whose sum reaches ``t`` times the total. An all-zero map gives 0.
    """
    flat = contribution.flatten().double()
    if (flat < 0).any():
        raise ValueError("contributions must be non-negative")
    cumulative = flat.sort(descending=True).values.cumsum(0)
    total = cumulative[-1]
    ratios = {}
    for t in thresholds:
        if not 0.0 < t <= 1.0:
            raise ValueError(f"thresholds must be in (0, 1], got {t}")
        if total == 0:
            ratios[t] = 0.0
            continue
        count = int(torch.searchsorted(cumulative, t * total)) + 1
        ratios[t] = min(count, flat.numel()) / flat.numel()
    return ratios


def centre_gradient(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor
) -> torch.Tensor:
    """``|d out[:, :, h // 2, w // 2].sum() / d images|`` summed over channels: ``(B, H, W)``.

    ``model`` maps ``(B, C, H, W)`` images to a ``(B, K, h, w)`` map (logits or features).
    """
    x = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x)
        if out.ndim != 4:
            raise ValueError(
                f"model must return a (B, K, h, w) map, got shape {tuple(out.shape)}; pass a "
                "segmenter or a features module (e.g. model.forward_features)"
            )
        h, w = out.shape[-2:]
        (grad,) = torch.autograd.grad(out[:, :, h // 2, w // 2].sum(), x)
    return grad.abs().sum(dim=1)


def effective_receptive_field(
    model: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    batch_size: int = 8,
) -> ReceptiveField:
    """ERF of ``model`` over ``images`` ``(N, C, H, W)`` (see :func:`centre_gradient`).

    Images run ``batch_size`` at a time; each image's gradient is its own only when the model
    treats images independently, so put it in eval mode.

    Args:
        model: Returns a ``(B, K, h, w)`` map.
        images: Input images, e.g. a few from the validation set or noise.
        thresholds: Shares of the total contribution to report area ratios for.
        batch_size: Images per forward/backward pass.
    """
    total = sum(centre_gradient(model, chunk).sum(0) for chunk in images.split(batch_size))
    assert isinstance(total, torch.Tensor)
    total = total.detach()
    return ReceptiveField(total, area_ratios(total, thresholds), images.shape[0])
