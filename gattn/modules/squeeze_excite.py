"""Squeeze-and-excitation: channel gates computed from globally pooled features.

Paper: Hu, Shen, Sun 2018, "Squeeze-and-Excitation Networks" (CVPR),
https://arxiv.org/abs/1709.01507.

``x * gate(W_2 act(W_1 avgpool(x)))``: global average pooling squeezes each channel to one
number that summarises the whole map, a bottleneck MLP (as 1x1 convs) models the channel
interactions, and a sigmoid gate re-weights the channels. The bottleneck width follows timm
(``rd_ratio`` rounded to a multiple of ``rd_divisor``), never below ``rd_divisor`` nor above
``C``, so small channel counts never give a zero-width bottleneck.
"""

from __future__ import annotations

import torch
from timm.layers import make_divisible
from torch import nn

from ._conv import ActFactory
from ._registry import register_block


def make_rd_channels(channels: int, rd_ratio: float = 1.0 / 16, rd_divisor: int = 8) -> int:
    """Bottleneck width of a channel-attention MLP.

    Args:
        channels: Channel count ``C``.
        rd_ratio: Reduction ratio; the nominal width is ``C * rd_ratio``.
        rd_divisor: The width is rounded to a multiple of this (at least ``rd_divisor``).

    Returns:
        ``min(C, make_divisible(C * rd_ratio, rd_divisor))``, always ``>= 1``.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    return min(channels, make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0))


@register_block("se")
class SEBlock(nn.Module):
    """Squeeze-and-excitation block ``x * gate(excite(mean_hw(x)))``.

    Args:
        channels: Channel count ``C``.
        rd_ratio: Bottleneck reduction ratio (1/16 in the paper).
        rd_channels: Bottleneck width; overrides ``rd_ratio`` when given.
        rd_divisor: Round the bottleneck width to a multiple of this.
        act_layer: Activation inside the bottleneck MLP.
        gate_layer: Gate applied to the excitation logits.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        act_layer: ActFactory = nn.ReLU,
        gate_layer: ActFactory = nn.Sigmoid,
    ) -> None:
        super().__init__()
        rd = rd_channels or make_rd_channels(channels, rd_ratio, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd, channels, 1)
        self.gate = gate_layer()

    def excite(self, pooled: torch.Tensor) -> torch.Tensor:
        """Bottleneck MLP on pooled descriptors ``(B, C, 1, 1)``; returns gate logits."""
        return self.fc2(self.act(self.fc1(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.excite(x.mean((2, 3), keepdim=True)))
