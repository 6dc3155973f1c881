"""Atrous spatial pyramid pooling with an image-level branch.

Paper: Chen, Papandreou, Schroff, Adam 2017, "Rethinking Atrous Convolution for Semantic Image
Segmentation" (DeepLabV3), https://arxiv.org/abs/1706.05587, Sec. 3.3.

Parallel branches on the same map: a 1x1 conv, one 3x3 conv per dilation rate, and global
average pooling -> 1x1 conv -> bilinear upsampling (the image-level feature that gives every
pixel the whole-image context). They are concatenated and projected back to ``C`` channels by
a 1x1 conv, followed by dropout.

Batch size 1: the image-level branch works on a ``1 x 1`` tensor, where BatchNorm has one
value per channel and fails in training mode at batch 1; it reuses the PSPNet
:class:`~gattn.modules.pyramid_pooling.PoolingBranch` with no norm by default
(``pool_norm_layer``). The atrous branches keep ``norm_layer``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._conv import ActFactory, NormFactory, conv_norm_act
from ._registry import register_block
from .pyramid_pooling import PoolingBranch


@register_block("aspp")
class ASPP(nn.Module):
    """DeepLabV3 ASPP mapping ``(B, C, H, W)`` to ``(B, C, H, W)``.

    Args:
        channels: Channel count ``C`` of input and output.
        rates: Dilation rates of the 3x3 branches (DeepLabV3 uses ``(6, 12, 18)`` at output
            stride 16; halve them for small maps or double them at output stride 8).
        rd_channels: Output channels of each branch; default ``C // 4`` (at least 1).
        norm_layer: Norm of the 1x1, atrous and projection convs; ``None`` for none.
        act_layer: Activation of every branch and of the projection.
        pool_norm_layer: Norm of the image-level branch; ``None`` (default) keeps it valid at
            batch size 1.
        drop_rate: Dropout probability after the projection (DeepLabV3 uses 0.5 in its head).
        align_corners: ``align_corners`` of the image-level branch's bilinear upsampling.
    """

    def __init__(
        self,
        channels: int,
        rates: Sequence[int] = (6, 12, 18),
        rd_channels: int | None = None,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU,
        pool_norm_layer: NormFactory | None = None,
        drop_rate: float = 0.0,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if any(r < 1 for r in rates):
            raise ValueError(f"rates must be positive, got {tuple(rates)}")
        rd = rd_channels or max(channels // 4, 1)
        branches: list[nn.Module] = [
            conv_norm_act(channels, rd, 1, norm_layer=norm_layer, act_layer=act_layer)
        ]
        branches += [
            conv_norm_act(channels, rd, 3, dilation=r, norm_layer=norm_layer, act_layer=act_layer)
            for r in rates
        ]
        branches.append(PoolingBranch(channels, rd, 1, pool_norm_layer, act_layer, align_corners))
        self.branches = nn.ModuleList(branches)
        self.project = conv_norm_act(
            rd * len(branches), channels, 1, norm_layer=norm_layer, act_layer=act_layer
        )
        self.drop = nn.Dropout(drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.drop(self.project(y))
