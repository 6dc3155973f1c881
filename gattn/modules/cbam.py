"""Convolutional block attention module: channel attention, then spatial attention.

Paper: Woo, Park, Lee, Kweon 2018, "CBAM: Convolutional Block Attention Module" (ECCV),
https://arxiv.org/abs/1807.06521.

* Channel attention: ``M_c = sigmoid(MLP(avgpool_hw(x)) + MLP(maxpool_hw(x)))`` with one MLP
  shared by both descriptors; it is the squeeze-and-excitation bottleneck of
  :class:`~gattn.modules.squeeze_excite.SEBlock` with a second, max-pooled descriptor.
* Spatial attention: ``M_s = sigmoid(conv_kxk([mean_c(x'); max_c(x')]))`` on the two
  channel-pooled maps of the channel-refined ``x' = M_c * x``. The conv has a bias and no
  norm, as in the paper's equation (the reference code's BatchNorm is left out).

Output ``M_s * x'``, sequential channel-then-spatial as the paper found best.
"""

from __future__ import annotations

import torch
from torch import nn

from ._conv import ActFactory
from ._registry import register_block
from .squeeze_excite import SEBlock


class ChannelAttention(SEBlock):
    """CBAM channel attention: the SE bottleneck applied to avg- and max-pooled descriptors.

    Args:
        channels: Channel count ``C``.
        rd_ratio: Bottleneck reduction ratio.
        rd_channels: Bottleneck width; overrides ``rd_ratio`` when given.
        rd_divisor: Round the bottleneck width to a multiple of this.
        act_layer: Activation inside the shared MLP.
        gate_layer: Gate applied to the summed logits.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.excite(x.mean((2, 3), keepdim=True)) + self.excite(
            x.amax((2, 3), keepdim=True)
        )
        return x * self.gate(logits)


class SpatialAttention(nn.Module):
    """CBAM spatial attention from the channel-wise mean and max maps.

    Args:
        kernel_size: Odd size of the conv over the two pooled maps (7 in the paper).
        gate_layer: Gate applied to the conv output.
    """

    def __init__(self, kernel_size: int = 7, gate_layer: ActFactory = nn.Sigmoid) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(pooled))


@register_block("cbam")
class CBAM(nn.Module):
    """Channel attention followed by spatial attention, ``(B, C, H, W) -> (B, C, H, W)``.

    Args:
        channels: Channel count ``C``.
        rd_ratio: Bottleneck reduction ratio of the channel MLP (1/16 in the paper).
        rd_channels: Bottleneck width; overrides ``rd_ratio`` when given.
        rd_divisor: Round the bottleneck width to a multiple of this.
        spatial_kernel_size: Odd kernel size of the spatial-attention conv.
        act_layer: Activation inside the channel MLP.
        gate_layer: Gate of both attentions.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        spatial_kernel_size: int = 7,
        act_layer: ActFactory = nn.ReLU,
        gate_layer: ActFactory = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.channel = ChannelAttention(
            channels, rd_ratio, rd_channels, rd_divisor, act_layer, gate_layer
        )
        self.spatial = SpatialAttention(spatial_kernel_size, gate_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
