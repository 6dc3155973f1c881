"""Anchor-free detector: a timm ``features_only`` backbone, an FPN from P2 or P3, an FCOS head.

Layout of FCOS (Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection",
https://arxiv.org/abs/1904.01355) on an FPN (Lin et al. 2017, "Feature Pyramid Networks for
Object Detection"): level ``P_l`` has stride ``2**l``; the finest is P2 (stride 4, for objects
of a few pixels) or P3 (stride 8, the paper's), the top is P5 or the backbone's coarsest
map if that comes first. Why FCOS (per-level assignment by object size) suits small objects:
see :mod:`gattn.models.fcos`. Global-context blocks sit in the FPN
(:class:`~gattn.models.fpn.FeaturePyramid`).

Global-context feedback for sliding-window detection, as for the
:class:`~gattn.models.segmenter.Segmenter`: :meth:`Detector.encode_context` pools the top FPN
level into one vector per image; passing the whole image's vector as ``global_context`` while
detecting in a window adds its projection to every level. The projection starts at zero, so a
detector trained without context is unchanged by it until it learns to use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from timm.models import FeatureInfo
from torch import nn

from .fcos import (
    CENTER_RADIUS,
    Target,
    fcos_loss,
    fcos_postprocess,
    flatten_levels,
    level_points,
    level_ranges,
)
from .fcos_head import FCOSHead
from .fpn import FeaturePyramid, GlobalAt, ModuleSpec

MIN_LEVELS = (2, 3)


@dataclass
class DetOutputs:
    """Raw per-level outputs of :meth:`Detector.forward`, finest level first.

    Attributes:
        cls_logits: Class logits ``(B, K, h_l, w_l)`` per level (sigmoid, no background class).
        bbox_reg: Distances ``(B, 4, h_l, w_l)`` (left, top, right, bottom) in input pixels
            from each location (:func:`~gattn.models.fcos.level_points`) to its box's edges.
        centerness: Centerness logits ``(B, 1, h_l, w_l)`` per level.
        image_size: ``(H, W)`` of the input images.
    """

    cls_logits: list[torch.Tensor]
    bbox_reg: list[torch.Tensor]
    centerness: list[torch.Tensor]
    image_size: tuple[int, int]


def pyramid_indices(
    reductions: Sequence[int], min_level: int, max_level: int, backbone: str = "the backbone"
) -> list[int]:
    """Indices of the backbone maps that feed FPN levels ``min_level`` up to at most
    ``max_level``: one map at each stride ``2**l``, without gaps (the last map of a stride).

    Raises:
        ValueError: ``min_level`` is not 2 or 3, or the backbone has no map at stride
            ``2**min_level`` and ``2**(min_level + 1)`` (e.g. a plain ViT, all maps at one
            stride); the message names the key and the fix.
    """
    if min_level not in MIN_LEVELS:
        raise ValueError(
            f"min_level must be 2 (P2, stride 4: small objects) or 3 (P3, stride 8), got "
            f"{min_level!r}; set model.min_level to 2 or 3"
        )
    if max_level <= min_level:
        raise ValueError(f"max_level must exceed min_level={min_level}, got {max_level}")
    by_stride = {int(r): i for i, r in enumerate(reductions)}
    indices = []
    for level in range(min_level, max_level + 1):
        if 2**level not in by_stride:
            break
        indices.append(by_stride[2**level])
    if len(indices) < 2:
        raise ValueError(
            f"backbone {backbone} gives feature maps at strides {list(reductions)}; the detector "
            f"needs one map at each stride from {2**min_level} (min_level={min_level}) to at "
            f"least {2 ** (min_level + 1)}. Use a hierarchical backbone (ResNet, ConvNeXt, Swin, "
            "gattn_local_cnn with 3+ widths) or a min_level it has; a plain ViT (one stride) "
            "needs a simple feature pyramid (ViTDet), which is not implemented"
        )
    return indices


class Detector(nn.Module):
    """FCOS detector on FPN levels ``P_min_level .. P_top`` of a timm backbone.

    Args:
        encoder: A timm model built with ``features_only=True`` (all its maps; the ones at
            strides ``2**min_level ..`` are used). Channels-last encoders (Swin) are permuted.
        num_classes: Object classes ``K``.
        min_level: Finest FPN level, 2 (P2, stride 4) or 3 (P3, stride 8).
        max_level: Coarsest FPN level at most (the backbone's coarsest map if finer).
        fpn_channels: Channels of the FPN levels and of the head.
        global_modules: Registry blocks in the FPN (see
            :class:`~gattn.models.fpn.FeaturePyramid`).
        global_at: ``"top"`` or ``"all"`` FPN levels get the blocks.
        num_convs: Convs per head tower (paper: 4).
        prior_prob: Initial foreground probability of the classifier.
        center_radius: Center sampling radius in strides (paper: 1.5).
        backbone: Name of the backbone, for error messages.
    """

    def __init__(
        self,
        encoder: nn.Module,
        num_classes: int,
        *,
        min_level: int = 3,
        max_level: int = 5,
        fpn_channels: int = 64,
        global_modules: Sequence[ModuleSpec] = (),
        global_at: GlobalAt = "top",
        num_convs: int = 4,
        prior_prob: float = 0.01,
        center_radius: float = CENTER_RADIUS,
        backbone: str = "the backbone",
    ) -> None:
        super().__init__()
        info = getattr(encoder, "feature_info", None)
        if not isinstance(info, FeatureInfo):
            raise TypeError(
                f"{type(encoder).__name__} has no timm FeatureInfo; build the encoder with "
                "features_only=True"
            )
        self.feature_indices = pyramid_indices(info.reduction(), min_level, max_level, backbone)
        channels = [int(info.channels()[i]) for i in self.feature_indices]
        self.strides = tuple(2 ** (min_level + i) for i in range(len(self.feature_indices)))
        fmt = getattr(encoder, "output_fmt", "NCHW")
        self.channels_last = getattr(fmt, "value", fmt) == "NHWC"
        self.num_classes = num_classes
        self.center_radius = center_radius
        self.encoder = encoder
        self.fpn = FeaturePyramid(
            channels, fpn_channels, global_modules=global_modules, global_at=global_at
        )
        self.context_proj = nn.Linear(fpn_channels, fpn_channels)
        self.head = FCOSHead(
            fpn_channels, num_classes, self.strides, num_convs=num_convs, prior_prob=prior_prob
        )
        nn.init.zeros_(self.context_proj.weight)
        nn.init.zeros_(self.context_proj.bias)

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """FPN levels ``(B, fpn_channels, h_l, w_l)`` of images ``(B, in_chans, H, W)``."""
        maps = self.encoder(x)
        feats = [maps[i] for i in self.feature_indices]
        if self.channels_last:
            feats = [f.permute(0, 3, 1, 2) for f in feats]
        return self.fpn(feats)

    def encode_context(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image context ``(B, fpn_channels)``: the average of the top FPN level."""
        return self.pyramid(x)[-1].mean(dim=(2, 3))

    def forward(self, x: torch.Tensor, global_context: torch.Tensor | None = None) -> DetOutputs:
        """Raw per-level outputs (:class:`DetOutputs`) of images ``(B, in_chans, H, W)``.

        Args:
            x: Images.
            global_context: Optional ``(B, fpn_channels)`` vectors (:meth:`encode_context` of
                the whole image), added after a zero-initialised projection to every level.
        """
        levels = self.pyramid(x)
        if global_context is not None:
            context = self.context_proj(global_context)[:, :, None, None]
            levels = [level + context for level in levels]
        cls_logits, bbox_reg, centerness = self.head(levels)
        return DetOutputs(cls_logits, bbox_reg, centerness, (x.shape[-2], x.shape[-1]))

    def _points(self, outputs: DetOutputs) -> tuple[torch.Tensor, list[int]]:
        sizes = [(m.shape[-2], m.shape[-1]) for m in outputs.cls_logits]
        points = level_points(sizes, self.strides, outputs.cls_logits[0].device)
        return torch.cat(points), [h * w for h, w in sizes]

    def loss(self, outputs: DetOutputs, targets: Sequence[Target]) -> dict[str, torch.Tensor]:
        """FCOS training losses (:func:`~gattn.models.fcos.fcos_loss`).

        Args:
            outputs: :meth:`forward` of the batch.
            targets: Per image ``{"boxes": (N, 4) float xyxy in input pixels, "labels": (N,)
                long in 0..K-1}``; ``N`` may be 0.

        Returns:
            ``loss`` (the total to minimise), ``loss_cls``, ``loss_box``, ``loss_ctr``.
        """
        points, counts = self._points(outputs)
        device = points.device
        strides = torch.cat(
            [
                torch.full((n,), float(s), device=device)
                for n, s in zip(counts, self.strides, strict=True)
            ]
        )
        ranges = torch.cat(
            [
                torch.tensor([lo, hi], device=device).expand(n, 2)
                for n, (lo, hi) in zip(counts, level_ranges(self.strides), strict=True)
            ]
        )
        return fcos_loss(
            flatten_levels(outputs.cls_logits),
            flatten_levels(outputs.bbox_reg),
            flatten_levels(outputs.centerness),
            points,
            strides,
            ranges,
            targets,
            center_radius=self.center_radius,
        )

    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        *,
        score_thresh: float = 0.05,
        nms_iou: float = 0.6,
        max_det: int = 100,
        global_context: torch.Tensor | None = None,
    ) -> list[Target]:
        """Detections per image: ``{"boxes": (n, 4) xyxy input pixels, "scores": (n,),
        "labels": (n,)}``, by score (:func:`~gattn.models.fcos.fcos_postprocess`).

        Put the model in eval mode first; gradients are not tracked.

        Args:
            images: ``(B, in_chans, H, W)``.
            score_thresh: Minimum score ``sqrt(p_class * p_centerness)``.
            nms_iou: IoU of class-wise NMS (``torchvision.ops.batched_nms``).
            max_det: Most boxes per image.
            global_context: As in :meth:`forward`.
        """
        outputs = self(images, global_context)
        points, counts = self._points(outputs)
        return fcos_postprocess(
            flatten_levels(outputs.cls_logits),
            flatten_levels(outputs.bbox_reg),
            flatten_levels(outputs.centerness),
            points,
            counts,
            outputs.image_size,
            score_thresh=score_thresh,
            nms_iou=nms_iou,
            max_det=max_det,
        )
