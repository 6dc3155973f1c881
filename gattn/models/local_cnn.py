"""The local baseline: a shallow CNN whose receptive field is a small fraction of the image.

A few 3x3 conv-norm-act layers (Simonyan & Zisserman 2015, "Very Deep Convolutional Networks
for Large-Scale Image Recognition"), stride 4 in total. With the defaults (two stages of two
convs) each output position sees ``19 x 19`` input pixels (:func:`receptive_field`), so any
task whose answer depends on pixels farther apart than that is out of its reach unless a
global-context block is injected (``inject(model, "nonlocal@2")``). Benchmarks compare the
global models against this one.

Stages are ``stages[k - 1]`` (NCHW) with timm ``feature_info``, so injection,
``features_only=True`` and the segmentation heads work as for any timm CNN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import ClassifierHead, ConvNormAct
from torch import nn

from gattn.modules._conv import ActFactory, NormFactory

DEFAULT_WIDTHS = (32, 64)


def receptive_field(num_stages: int, convs_per_stage: int, kernel_size: int = 3) -> int:
    """Receptive field (pixels per side) of :class:`LocalCNN`'s output.

    Each stage is a stride-2 conv followed by ``convs_per_stage - 1`` stride-1 convs; a conv
    of size ``k`` grows the field by ``(k - 1) * J``, with ``J`` the product of the strides
    before it.

    Args:
        num_stages: Stages (each halves the resolution).
        convs_per_stage: Convs per stage.
        kernel_size: Kernel size of every conv.

    Returns:
        The receptive field side in input pixels.
    """
    field, jump = 1, 1
    for _ in range(num_stages):
        for i in range(convs_per_stage):
            field += (kernel_size - 1) * jump
            if i == 0:
                jump *= 2
    return field


class LocalCNN(nn.Module):
    """Stages of 3x3 conv-norm-act layers (the first of each with stride 2), then a classifier.

    Args:
        num_classes: Classifier outputs; ``0`` for none (``forward`` returns pooled features).
        in_chans: Input channels.
        widths: Channels of each stage; the output stride is ``2 ** len(widths)``.
        convs_per_stage: Conv layers per stage.
        global_pool: timm pooling type of the classifier head.
        drop_rate: Dropout before the classifier.
        norm_layer: Norm after each conv.
        act_layer: Activation after each norm.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        convs_per_stage: int = 2,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        norm_layer: NormFactory = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        if not widths or convs_per_stage < 1:
            msg = "need non-empty widths and convs_per_stage >= 1"
            raise ValueError(f"{msg}, got {widths=}, {convs_per_stage=}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        stages, self.feature_info, prev = [], [], in_chans
        for i, width in enumerate(widths):
            convs = [
                ConvNormAct(
                    prev if j == 0 else width,
                    width,
                    3,
                    stride=2 if j == 0 else 1,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                )
                for j in range(convs_per_stage)
            ]
            stages.append(nn.Sequential(*convs))
            self.feature_info.append(
                {"num_chs": width, "reduction": 2 ** (i + 1), "module": f"stages.{i}"}
            )
            prev = width
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.head = ClassifierHead(prev, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` to the last feature map ``(B, widths[-1], H / s, W / s)``."""
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
