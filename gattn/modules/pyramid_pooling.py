"""Pyramid pooling module: context pooled over the whole map at several grid sizes.

Paper: Zhao, Shi, Qi, Wang, Jia 2017, "Pyramid Scene Parsing Network" (PSPNet, CVPR),
https://arxiv.org/abs/1612.01105, Sec. 3.2.

Each branch average-pools the map to an ``s x s`` grid (``s = 1`` is the image-level prior),
reduces it with a 1x1 conv and upsamples it bilinearly back to ``H x W``; the branches are
concatenated with the input and fused by a 3x3 conv back to ``C`` channels.

Norm of the pooled branches: the paper puts BatchNorm after each branch's 1x1 conv, but the
``1 x 1`` pooled tensor holds one value per channel and sample, so BatchNorm cannot compute a
training-mode variance at batch 1 (PyTorch raises), and at small batches its statistics are
noise. The branches therefore default to ``GroupNorm(1, ...)`` (normalised over the channels of
each sample, valid at any batch size). Without a norm the pooled context is a small signal next
to the input's channels: in the tune stage's 4-epoch cue-seg trials the module found the distant
cue in epoch 3-4 (0.06-0.48 mIoU after epoch 2); with the norm mostly by epoch 2 (0.54-0.77),
on 4 seeds each (``benchmarks/tune_points.py``). ``pool_norm_layer=None`` gives the un-normalised
branch. The fusion conv, which sees the full ``H x W`` map, keeps ``norm_layer``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ._conv import ActFactory, NormFactory, conv_norm_act
from ._registry import register_block


class PoolingBranch(nn.Module):
    """Adaptive average pool to ``pool_size``, 1x1 conv(-norm)-act, bilinear upsample back.

    Args:
        in_channels: Input channels.
        out_channels: Output channels of the 1x1 conv.
        pool_size: Side of the pooled grid; ``1`` is global average pooling.
        norm_layer: Norm on the pooled tensor; ``None`` (default) for none, which keeps the
            branch valid at batch size 1. Must not need batch statistics when ``pool_size=1``.
        act_layer: Activation after the conv.
        align_corners: ``align_corners`` of the bilinear upsampling.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        pool_size: int,
        norm_layer: NormFactory | None = None,
        act_layer: ActFactory | None = nn.ReLU,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.conv = conv_norm_act(
            in_channels, out_channels, 1, norm_layer=norm_layer, act_layer=act_layer
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.pool(x))
        return F.interpolate(
            y, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )


@register_block("ppm")
class PyramidPoolingModule(nn.Module):
    """PSPNet pyramid pooling, ``fuse(cat[x, up(branch_s(x)) for s in pool_sizes])``.

    Args:
        channels: Channel count ``C`` of input and output.
        pool_sizes: Grid side of each pooling branch.
        rd_channels: Output channels of each branch; default ``C // len(pool_sizes)`` (at
            least 1), as in the paper.
        norm_layer: Norm of the 3x3 fusion conv; ``None`` for none.
        act_layer: Activation of the branches and of the fusion conv.
        pool_norm_layer: Norm of the pooled branches; default ``GroupNorm(1, ...)``, ``None``
            for none (see the module docstring for why not BatchNorm).
        align_corners: ``align_corners`` of the bilinear upsampling.
    """

    def __init__(
        self,
        channels: int,
        pool_sizes: Sequence[int] = (1, 2, 3, 6),
        rd_channels: int | None = None,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU,
        pool_norm_layer: NormFactory | None = partial(nn.GroupNorm, 1),
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if not pool_sizes or min(pool_sizes) < 1:
            raise ValueError(f"pool_sizes must be positive, got {tuple(pool_sizes)}")
        rd = rd_channels or max(channels // len(pool_sizes), 1)
        self.branches = nn.ModuleList(
            PoolingBranch(channels, rd, s, pool_norm_layer, act_layer, align_corners)
            for s in pool_sizes
        )
        self.fuse = conv_norm_act(
            channels + rd * len(pool_sizes),
            channels,
            3,
            norm_layer=norm_layer,
            act_layer=act_layer,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([x, *(branch(x) for branch in self.branches)], dim=1))
