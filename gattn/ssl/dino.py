"""DINO: self-distillation with no labels, a student and an EMA teacher over multi-crop views.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(https://arxiv.org/abs/2104.14294). The student sees every crop (2 global + N local, made by
:class:`gattn.data.views.MultiCropViews`); the teacher, an exponential moving average of the
student that never receives gradients, sees the global crops only, so the student learns to
infer the whole image's representation from a small part of it, the "local-to-global"
correspondence the article asks for. The loss is :class:`gattn.ssl.dino_loss.DINOLoss`.

Any backbone that maps ``(B, C, H, W)`` to pooled features ``(B, D)`` works: a timm CNN or ViT
created with ``num_classes=0`` (a ViT needs ``dynamic_img_size=True`` to take local crops
smaller than its ``img_size``). As in DINO's ``MultiCropWrapper``, crops of one resolution go
through the backbone together, one forward per resolution.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .schedules import schedule_values

__all__ = ["DINO", "DINOHead", "MultiCropWrapper", "dino_param_groups", "momentum_schedule"]


def momentum_schedule(base: float, final: float, total_steps: int) -> torch.Tensor:
    """The teacher EMA momentum at every step: cosine from ``base`` towards ``final``.

    ``m_t = final - (final - base) * (cos(pi * t / total_steps) + 1) / 2``, the schedule of
    the DINO paper (``base`` 0.996, ``final`` 1.0); entry ``t`` is the momentum of step ``t``.
    """
    return schedule_values(total_steps, base, final)


def dino_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as DINO's ``get_params_groups``: weights decayed, biases and norms not.

    Group 0 holds the decayed parameters (a weight-decay schedule updates that group only),
    group 1 the others (``ndim <= 1`` or named ``*.bias``); frozen parameters (the teacher's)
    are left out.

    Args:
        model: The module whose trainable parameters are grouped (e.g. a :class:`DINO`).
        weight_decay: The decayed group's (initial) weight decay.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class DINOHead(nn.Module):
    """Projection head: an MLP to a bottleneck, L2 normalisation, a weight-normalised linear.

    Args:
        in_dim: Backbone feature width.
        out_dim: Output dimension ``K`` (65536 in DINO; a few thousand suffice for small data).
        hidden_dim: Width of the hidden MLP layers.
        bottleneck_dim: Width of the normalised bottleneck.
        nlayers: Linear layers in the MLP (``>= 1``).
        norm_last_layer: Fix the weight-norm gains of the last layer to 1 (more stable;
            DINO turns it off for ViT-S only).
        use_bn: BatchNorm after the hidden linear layers.
        act_layer: Activation of the MLP.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers={nlayers} must be >= 1")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(d_in, d_out))
            if i < nlayers - 1:
                layers += [nn.BatchNorm1d(d_out)] if use_bn else []
                layers.append(act_layer())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.norm_last_layer = norm_last_layer
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) linears, zero biases, unit weight-norm gains."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        weight = self.last_layer.parametrizations.weight
        trunc_normal_(weight.original1, std=0.02)
        with torch.no_grad():
            weight.original0.fill_(1.0)
        weight.original0.requires_grad_(not self.norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops, one backbone pass per run of equal-size crops.

    Args:
        backbone: ``(B, C, H, W) -> (B, D)`` pooled features.
        head: ``(B, D) -> (B, K)``.

    Call with a list of crop batches ``[(B, C, H_i, W_i), ...]`` (or one tensor); returns the
    head outputs ``(len(crops) * B, K)``, crop-major, in the order of the list.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats = []
        for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:])):
            out = self.backbone(torch.cat(list(group)))
            if out.ndim != 2:
                raise ValueError(
                    f"backbone returned {tuple(out.shape)}, expected pooled (B, D) features "
                    "(create timm backbones with num_classes=0)"
                )
            feats.append(out)
        return self.head(torch.cat(feats))


class DINO(nn.Module):
    """Student and EMA teacher, each a backbone with a :class:`DINOHead`.

    Args:
        student_backbone: The backbone to train.
        teacher_backbone: A second instance of the same architecture; its weights are
            replaced by the student's, then it only follows them by :meth:`update_teacher`.
        out_dim, hidden_dim, bottleneck_dim, nlayers, norm_last_layer, use_bn: The heads'
            arguments (:class:`DINOHead`).
        in_dim: Backbone feature width (default: the backbone's ``num_features``).

    Call with ``(global_views, local_views)``, lists of crop batches (the collated output of
    :class:`~gattn.data.views.MultiCropViews`); returns ``(student_output, teacher_output)``
    for :class:`~gattn.ssl.dino_loss.DINOLoss`: the student's outputs on all crops, global
    first, and the teacher's on the global crops, computed without gradients.
    """

    def __init__(
        self,
        student_backbone: nn.Module,
        teacher_backbone: nn.Module,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
        in_dim: int | None = None,
    ) -> None:
        super().__init__()
        in_dim = in_dim or getattr(student_backbone, "num_features", None)
        if not isinstance(in_dim, int):
            raise TypeError(
                f"{type(student_backbone).__name__} has no int num_features; pass in_dim"
            )
        head = functools.partial(
            DINOHead,
            in_dim,
            out_dim,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            nlayers=nlayers,
            norm_last_layer=norm_last_layer,
            use_bn=use_bn,
        )
        self.student = MultiCropWrapper(student_backbone, head())
        self.teacher = MultiCropWrapper(teacher_backbone, head())
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)

    def forward(
        self, global_views: Sequence[torch.Tensor], local_views: Sequence[torch.Tensor] = ()
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_output = self.teacher(global_views)
        return self.student([*global_views, *local_views]), teacher_output

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student``, parameter-wise.

        Buffers (BatchNorm statistics) are not averaged: the teacher keeps its own, as in DINO.
        """
        teacher: list[torch.Tensor] = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)

    def cancel_last_layer_gradients(self) -> None:
        """Drop the gradients of the student head's last layer, so the optimizer leaves it as it
        is this step (DINO freezes it during the first epoch, while the prototypes would otherwise
        chase a still random student; ``cancel_gradients_last_layer`` of the official code)."""
        head = self.student.head
        if not isinstance(head, DINOHead):
            raise TypeError(f"the student's head is a {type(head).__name__}, not a DINOHead")
        for p in head.last_layer.parameters():
            p.grad = None

    def encoder_state_dict(self, which: str = "teacher") -> dict[str, torch.Tensor]:
        """The ``"teacher"`` (DINO's evaluated encoder) or ``"student"`` backbone's weights."""
        if which not in ("teacher", "student"):
            raise ValueError(f"which={which!r} must be 'teacher' or 'student'")
        return getattr(self, which).backbone.state_dict()
