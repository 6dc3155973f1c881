"""FCOS head: one set of towers and predictors shared by every FPN level.

Paper: Tian, Shen, Chen, He 2019, "FCOS: Fully Convolutional One-Stage Object Detection"
(ICCV), https://arxiv.org/abs/1904.01355, with its later improvements (centerness on the
regression tower, regression normalised by the level's stride). Two towers of ``num_convs``
3x3 conv-GroupNorm-ReLU layers (paper: 4, 256 channels) run on every level with the same
weights: the classification tower feeds a 3x3 conv to ``K`` sigmoid logits, the regression
tower a 3x3 conv to the four distances and one to the centerness logit. A learnt scalar per
level scales the distances, ``relu(scale_l * x) * stride_l`` pixels, since the levels share
the conv but not the object size.

Initialisation as in the paper (Sec. 3.1, following RetinaNet): every conv ``N(0, 0.01)``
with zero bias, except the classifier bias ``-log((1 - pi) / pi)`` with ``pi = prior_prob =
0.01``, so at the start every location predicts background with probability 0.99 and the
focal loss is not swamped by the easy negatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from gattn.modules._conv import conv_norm_act

GN_GROUPS = 32  # the paper's GroupNorm groups (fewer where the width is not a multiple)


def group_norm(channels: int) -> nn.GroupNorm:
    """``GroupNorm`` with the paper's 32 groups, or the largest divisor of ``channels`` below."""
    return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)


class FCOSHead(nn.Module):
    """Shared FCOS head over FPN levels.

    Args:
        channels: Channels of every FPN level (and of the towers).
        num_classes: Object classes ``K`` (no background class: sigmoid outputs).
        strides: Stride of each level, finest first (one learnt scale each).
        num_convs: 3x3 conv-GN-ReLU layers per tower (paper: 4).
        prior_prob: Initial foreground probability of every classifier output.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        strides: Sequence[int],
        *,
        num_convs: int = 4,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if num_classes < 1 or num_convs < 0 or not 0 < prior_prob < 1:
            raise ValueError(
                "need num_classes >= 1, num_convs >= 0 and 0 < prior_prob < 1, got "
                f"{num_classes}, {num_convs}, {prior_prob}"
            )
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.prior_prob = prior_prob

        def tower() -> nn.Sequential:
            return nn.Sequential(
                *(
                    conv_norm_act(channels, channels, 3, norm_layer=group_norm)
                    for _ in range(num_convs)
                )
            )

        self.cls_tower, self.bbox_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        prior_bias = -math.log((1 - self.prior_prob) / self.prior_prob)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.constant_(module.bias, prior_bias if module is self.cls_logits else 0.0)
        nn.init.ones_(self.scales)

    def forward(
        self, features: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per level: class logits ``(B, K, h, w)``, distances ``(B, 4, h, w)`` (l, t, r, b)
        in input pixels, centerness logits ``(B, 1, h, w)``."""
        if len(features) != len(self.strides):
            raise ValueError(f"{len(features)} levels for a head of {len(self.strides)}")
        cls_logits, bbox_reg, ctr_logits = [], [], []
        for level, (feat, stride) in enumerate(zip(features, self.strides, strict=True)):
            cls_logits.append(self.cls_logits(self.cls_tower(feat)))
            reg_feat = self.bbox_tower(feat)
            bbox_reg.append(torch.relu(self.scales[level] * self.bbox_pred(reg_feat)) * stride)
            ctr_logits.append(self.centerness(reg_feat))
        return cls_logits, bbox_reg, ctr_logits
