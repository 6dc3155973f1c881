"""FCN head: a few convolutions on the last feature map, the local baseline among the heads.

Paper: Long, Shelhamer, Darrell 2015, "Fully Convolutional Networks for Semantic
Segmentation" (CVPR), https://arxiv.org/abs/1411.4038; layout of mmsegmentation's ``FCNHead``
(``num_convs`` 3x3 conv-norm-act layers, optionally concatenated with the input and fused by
one more conv). Each 3x3 conv adds only ``2 * dilation`` feature-map cells to the receptive
field: nothing in this head sees the whole image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import DecodeHead


class FCNHead(DecodeHead):
    """``num_convs`` conv-norm-act layers, then (``concat_input``) ``conv(cat[x, y])``.

    Args:
        in_channels, channels, num_classes: See :class:`DecodeHead`.
        num_convs: Conv layers; ``0`` requires ``in_channels == channels``.
        kernel_size: Odd kernel size of the convs.
        dilation: Dilation of the convs.
        concat_input: Concatenate the input with the conv output and fuse them by one more
            conv of ``kernel_size``.
        **kwargs: ``dropout_ratio``, ``norm_layer``, ``act_layer``, ``context_channels`` of
            :class:`DecodeHead`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        num_convs: int = 2,
        kernel_size: int = 3,
        dilation: int = 1,
        concat_input: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, **kwargs)
        if num_convs < 0 or (num_convs == 0 and in_channels != channels):
            raise ValueError(
                f"num_convs must be >= 1, or 0 with in_channels == channels; got {num_convs} "
                f"with in_channels={in_channels}, channels={channels}"
            )
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(
            *(self.conv_module(c_in, channels, kernel_size, dilation) for c_in in widths[:-1])
        )
        self.conv_cat = (
            self.conv_module(in_channels + channels, channels, kernel_size)
            if concat_input
            else None
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return y
