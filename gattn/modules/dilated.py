"""Stacked 3x3 dilated convolutions with hybrid dilation rates (no gridding).

Paper: Wang, Chen, Yuan, Liu, Huang, Hou, Cottrell 2018, "Understanding Convolution for
Semantic Segmentation" (WACV), https://arxiv.org/abs/1702.08502, Sec. 3.2 (HDC).

Stacking 3x3 convs whose dilation rates share a factor ``g > 1`` (e.g. ``(2, 4, 8)``) only
ever samples every ``g``-th input pixel: the receptive field is a checkerboard with holes
("gridding"). Hybrid dilated convolution picks rates with no common factor and requires
``M_2 <= K`` for the maximum distance between two sampled pixels,

    M_n = r_n,   M_i = max(M_{i+1} - 2 r_i,  M_{i+1} - 2 (M_{i+1} - r_i),  r_i),

so that the first, rate-1 layer fills every gap. The sampled offsets of a stack are the
Minkowski sum of each layer's ``{-r, 0, r}``, which does not depend on the layer order, so the
condition is evaluated on the sorted rates (the recursion assumes non-decreasing rates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ._conv import ActFactory, NormFactory, conv_norm_act
from ._registry import register_block

HDC_KERNEL_SIZE = 3


def hdc_max_distance(rates: Sequence[int]) -> int:
    """``M_2`` of the HDC recursion for 3x3 kernels: largest gap left for the first layer.

    Args:
        rates: Dilation rates, first layer first, non-decreasing.

    Returns:
        ``M_2``; ``1`` for a single layer (nothing above it leaves a gap).
    """
    if len(rates) < 2:
        return 1
    m = rates[-1]
    for r in reversed(rates[1:-1]):
        m = max(m - 2 * r, m - 2 * (m - r), r)
    return m


def hdc_violation(rates: Sequence[int]) -> str | None:
    """Why a stack of 3x3 convs with these dilation rates leaves holes, or ``None`` if not.

    Args:
        rates: Dilation rates of the successive 3x3 convs.

    Returns:
        ``None`` when the rates satisfy HDC (the receptive field is a full square), otherwise a
        sentence naming the violated condition.

    Raises:
        ValueError: ``rates`` is empty or holds something other than positive integers.
    """
    if not rates or any(int(r) != r or r < 1 for r in rates):
        raise ValueError(f"rates must be a non-empty sequence of positive integers, got {rates}")
    ordered = sorted(int(r) for r in rates)
    factor = math.gcd(*ordered)
    if factor > 1:
        return (
            f"rates {tuple(rates)} share the factor {factor}: the stack only samples every "
            f"{factor}-th pixel (gridding)"
        )
    if ordered[0] != 1:
        return (
            f"rates {tuple(rates)} have no rate 1: nothing fills the gaps of width "
            f"{ordered[0]} between sampled pixels"
        )
    m2 = hdc_max_distance(ordered)
    if m2 > HDC_KERNEL_SIZE:
        return (
            f"rates {tuple(rates)} give M_2 = {m2} > K = {HDC_KERNEL_SIZE}: the rate-1 layer "
            "cannot fill the gaps"
        )
    return None


def satisfies_hdc(rates: Sequence[int]) -> bool:
    """Whether 3x3 convs with these dilation rates cover their receptive field without holes.

    Args:
        rates: Dilation rates (positive integers) of the successive 3x3 convs.
    """
    return hdc_violation(rates) is None


@register_block("dilated")
class DilatedConvBlock(nn.Module):
    """Residual stack of 3x3 dilated convs, ``x + convs(x)``, mapping ``C -> C``.

    Each conv is followed by ``norm_layer``; all but the last also by ``act_layer``. The
    receptive field is a ``(2 sum(rates) + 1)`` square, hole-free when the rates satisfy HDC.

    Args:
        channels: Channel count ``C``.
        rates: Dilation rate of each successive 3x3 conv, first layer first.
        norm_layer: Norm after each conv; ``None`` gives the convs a bias instead.
        act_layer: Activation between convs; ``None`` for a linear stack.
        allow_gridding: Build the block even if the rates violate HDC (for ablations).

    Raises:
        ValueError: The rates violate HDC and ``allow_gridding`` is ``False``, or they are not
            positive integers.
    """

    def __init__(
        self,
        channels: int,
        rates: Sequence[int] = (1, 2, 5),
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        act_layer: ActFactory | None = nn.ReLU,
        allow_gridding: bool = False,
    ) -> None:
        super().__init__()
        violation = hdc_violation(rates)
        if violation is not None and not allow_gridding:
            raise ValueError(
                f"{violation}; choose rates satisfying hybrid dilated convolution such as "
                "(1, 2, 5), or pass allow_gridding=True"
            )
        self.rates = tuple(int(r) for r in rates)
        last = len(self.rates) - 1
        self.convs = nn.Sequential(
            *(
                conv_norm_act(
                    channels,
                    channels,
                    HDC_KERNEL_SIZE,
                    dilation=r,
                    norm_layer=norm_layer,
                    act_layer=act_layer if i < last else None,
                )
                for i, r in enumerate(self.rates)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.convs(x)
