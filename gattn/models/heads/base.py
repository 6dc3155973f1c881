"""Base of the segmentation decode heads, after mmsegmentation's ``BaseDecodeHead``.

Long et al. 2015 ("Fully Convolutional Networks for Semantic Segmentation") classify every
position of a feature map with a 1x1 convolution; every head here shares that classifier
(:meth:`DecodeHead.cls_seg`, dropout then a 1x1 conv) and differs only in how it turns the
backbone's last feature map ``(B, in_channels, h, w)`` into ``(B, channels, h, w)``
(:meth:`DecodeHead.forward_features`). Logits stay at the feature resolution; the
:class:`~gattn.models.segmenter.Segmenter` upsamples them.

Global-context feedback: ``forward(x, global_context)`` accepts a per-image vector
``(B, context_channels)`` (e.g. the pooled encoder features of the whole, downscaled image
while a sliding window sees one crop). It is projected to ``channels`` and added to every
position before the classifier. The projection starts at zero, so a head trained without
context is unchanged by it until it learns to use it.
"""

from __future__ import annotations

import torch
from torch import nn

from gattn.modules._conv import ActFactory, NormFactory, conv_norm_act


class DecodeHead(nn.Module):
    """Shared classifier and global-context fusion of the decode heads.

    Args:
        in_channels: Channels of the input feature map.
        channels: Channels of the head's features, before the classifier.
        num_classes: Output classes ``K``.
        dropout_ratio: ``Dropout2d`` rate before the classifier; ``0`` for none.
        norm_layer: Norm of the head's convolutions; ``None`` for none.
        act_layer: Activation of the head's convolutions.
        context_channels: Width ``C_g`` of the optional ``global_context`` vector; ``None``
            builds a head that takes no context.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        dropout_ratio: float = 0.1,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU,
        context_channels: int | None = None,
    ) -> None:
        super().__init__()
        if min(in_channels, channels, num_classes) < 1:
            raise ValueError(
                "in_channels, channels and num_classes must be positive, got "
                f"{in_channels}, {channels}, {num_classes}"
            )
        self.in_channels = in_channels
        self.channels = channels
        self.num_classes = num_classes
        self.norm_layer = norm_layer
        self.act_layer = act_layer
        self.context_channels = context_channels
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        self.context_proj = nn.Linear(context_channels, channels) if context_channels else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # PyTorch's default init, not mmseg's normal(std=0.01): that one suits pretrained
        # backbones, but from scratch it stalls a global model at the local model's mIoU on
        # the cue-seg benchmark (~0.35 against 0.88 after 124 steps; benchmarks/benchmark_data.py).
        self.conv_seg.reset_parameters()
        if self.context_proj is not None:
            nn.init.zeros_(self.context_proj.weight)
            nn.init.zeros_(self.context_proj.bias)

    def conv_module(
        self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
    ) -> nn.Sequential:
        """A "same"-padded conv with the head's ``norm_layer`` and ``act_layer``."""
        return conv_norm_act(
            in_channels,
            out_channels,
            kernel_size,
            dilation,
            norm_layer=self.norm_layer,
            act_layer=self.act_layer,
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, h, w)`` to ``(B, channels, h, w)``; defined by each head."""
        raise NotImplementedError

    def fuse_context(self, feat: torch.Tensor, global_context: torch.Tensor | None) -> torch.Tensor:
        """Add the projected ``global_context`` ``(B, C_g)`` to every position of ``feat``."""
        if global_context is None:
            return feat
        if self.context_proj is None:
            raise ValueError(
                f"{type(self).__name__} was built without context_channels, so it cannot take "
                "a global_context; build it with context_channels=C_g"
            )
        if global_context.shape != (feat.shape[0], self.context_channels):
            raise ValueError(
                f"global_context must be (B, {self.context_channels}) = "
                f"({feat.shape[0]}, {self.context_channels}), got {tuple(global_context.shape)}"
            )
        return feat + self.context_proj(global_context)[:, :, None, None]

    def cls_seg(self, feat: torch.Tensor) -> torch.Tensor:
        """Classify every position: dropout, then a 1x1 conv to ``num_classes``."""
        return self.conv_seg(self.dropout(feat))

    def forward(self, x: torch.Tensor, global_context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, K, h, w)`` at the resolution of ``x`` ``(B, in_channels, h, w)``."""
        return self.cls_seg(self.fuse_context(self.forward_features(x), global_context))
