"""DeepLabV3 head: atrous spatial pyramid pooling with an image-level branch.

Paper: Chen, Papandreou, Schroff, Adam 2017, "Rethinking Atrous Convolution for Semantic Image
Segmentation" (DeepLabV3), https://arxiv.org/abs/1706.05587, Sec. 3.3; head layout of
mmsegmentation's ``ASPPHead``: an image-pooling branch, a 1x1 branch and one dilated 3x3
branch per rate, all with ``channels`` outputs, concatenated and fused by a 3x3 bottleneck.
The image-pooling branch is the ``ppm`` block's
:class:`~gattn.modules.pyramid_pooling.PoolingBranch` without a norm, so the head trains at
batch size 1 (a BatchNorm on a ``1 x 1`` pooled tensor cannot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gattn.modules.pyramid_pooling import PoolingBranch

from .base import DecodeHead


class ASPPHead(DecodeHead):
    """``bottleneck(cat[pool(x), conv1x1(x), atrous_r(x) for r in rates])``.

    Args:
        in_channels, channels, num_classes: See :class:`DecodeHead`.
        rates: Dilation rates of the 3x3 branches. DeepLabV3 uses ``(6, 12, 18)`` at output
            stride 16; on the small maps of a stride-32 encoder ``(1, 2, 3)`` fit better.
        align_corners: ``align_corners`` of the image-pooling branch's upsampling.
        **kwargs: ``dropout_ratio``, ``norm_layer``, ``act_layer``, ``context_channels`` of
            :class:`DecodeHead`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        rates: Sequence[int] = (6, 12, 18),
        align_corners: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        if any(r < 1 for r in rates):
            raise ValueError(f"rates must be positive, got {tuple(rates)}")
        self.branches = nn.ModuleList(
            [
                PoolingBranch(
                    in_channels, channels, 1, act_layer=self.act_layer, align_corners=align_corners
                ),
                self.conv_module(in_channels, channels, 1),
                *(self.conv_module(in_channels, channels, 3, dilation=r) for r in rates),
            ]
        )
        self.bottleneck = self.conv_module(channels * len(self.branches), channels, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([branch(x) for branch in self.branches], dim=1))
