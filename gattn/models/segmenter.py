"""Encoder-decoder segmenter: a timm ``features_only`` encoder and a decode head.

Layout of FCN (Long et al. 2015, "Fully Convolutional Networks for Semantic Segmentation")
and mmsegmentation's ``EncoderDecoder``: the head classifies the encoder's last feature map
and the logits are upsampled bilinearly to the input size.

Global-context feedback for sliding-window inference: :meth:`Segmenter.encode_context` pools
the encoder's last map into one vector per image; passing the vector of the whole
(downscaled) image as ``global_context`` while segmenting each window lets the head see what
the window cannot (the head fuses it, see :class:`~gattn.models.heads.base.DecodeHead`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import FeatureInfo
from torch import nn

from .heads.base import DecodeHead


def last_feature_channels(encoder: nn.Module) -> int:
    """Channels of the last feature map of a timm ``features_only`` encoder."""
    info = getattr(encoder, "feature_info", None)
    if not isinstance(info, FeatureInfo):
        raise TypeError(
            f"{type(encoder).__name__} has no timm FeatureInfo; build the encoder with "
            "features_only=True"
        )
    return int(info.channels()[-1])


class Segmenter(nn.Module):
    """``upsample(head(encoder(x)[-1], global_context))`` to the input size.

    Args:
        encoder: A timm model built with ``features_only=True`` (a list of maps; the last one
            is used). Channels-last encoders (``output_fmt == "NHWC"``, Swin) are permuted.
        head: A decode head whose ``in_channels`` match the encoder's last map.
        align_corners: ``align_corners`` of the final bilinear upsampling.
    """

    def __init__(
        self, encoder: nn.Module, head: DecodeHead, *, align_corners: bool = False
    ) -> None:
        super().__init__()
        self.encoder_channels = last_feature_channels(encoder)
        if head.in_channels != self.encoder_channels:
            raise ValueError(
                f"head.in_channels={head.in_channels} but the encoder's last feature map has "
                f"{self.encoder_channels} channels"
            )
        fmt = getattr(encoder, "output_fmt", "NCHW")
        self.channels_last = getattr(fmt, "value", fmt) == "NHWC"
        self.encoder = encoder
        self.head = head
        self.num_classes = head.num_classes
        self.align_corners = align_corners

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's last feature map ``(B, C, h, w)`` of images ``(B, in_chans, H, W)``."""
        feat = self.encoder(x)[-1]
        return feat.permute(0, 3, 1, 2) if self.channels_last else feat

    def encode_context(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image context ``(B, C)``: the average of the encoder's last feature map."""
        return self.forward_features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, global_context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, num_classes, H, W)`` at the input size.

        Args:
            x: Images ``(B, in_chans, H, W)``.
            global_context: Optional ``(B, C_g)`` context (see :meth:`encode_context`); needs a
                head built with ``context_channels=C_g``.
        """
        logits = self.head(self.forward_features(x), global_context)
        return F.interpolate(
            logits, size=x.shape[-2:], mode="bilinear", align_corners=self.align_corners
        )
