"""PSP head: pyramid pooling over the whole map, then one fusion convolution.

Paper: Zhao, Shi, Qi, Wang, Jia 2017, "Pyramid Scene Parsing Network" (CVPR),
https://arxiv.org/abs/1612.01105; head layout of mmsegmentation's ``PSPHead``. Each branch
average-pools the map to an ``s x s`` grid, so the ``s = 1`` branch gives every position a
summary of the whole image. The branches are the
:class:`~gattn.modules.pyramid_pooling.PoolingBranch` of the ``ppm`` block (no norm on the
pooled tensors, so the head trains at batch size 1); unlike the ``ppm`` block, which maps
``C`` back to ``C``, the head's bottleneck goes straight to ``channels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gattn.modules.pyramid_pooling import PoolingBranch

from .base import DecodeHead


class PSPHead(DecodeHead):
    """``bottleneck(cat[x, up(branch_s(x)) for s in pool_sizes])``.

    Args:
        in_channels, channels, num_classes: See :class:`DecodeHead`.
        pool_sizes: Grid side of each pooling branch; each branch has ``channels`` outputs.
        align_corners: ``align_corners`` of the branches' bilinear upsampling.
        **kwargs: ``dropout_ratio``, ``norm_layer``, ``act_layer``, ``context_channels`` of
            :class:`DecodeHead`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        pool_sizes: Sequence[int] = (1, 2, 3, 6),
        align_corners: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        if not pool_sizes or min(pool_sizes) < 1:
            raise ValueError(f"pool_sizes must be positive, got {tuple(pool_sizes)}")
        self.branches = nn.ModuleList(
            PoolingBranch(
                in_channels, channels, s, act_layer=self.act_layer, align_corners=align_corners
            )
            for s in pool_sizes
        )
        self.bottleneck = self.conv_module(in_channels + channels * len(pool_sizes), channels, 3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bottleneck(torch.cat([x, *(branch(x) for branch in self.branches)], dim=1))
