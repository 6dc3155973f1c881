"""Non-local block: every position attends to every other position of a feature map.

Paper: Wang, Girshick, Gupta, He 2018, "Non-local Neural Networks" (CVPR),
https://arxiv.org/abs/1711.07971.

``z = x + W_z(y)`` with ``y_i = sum_j f(x_i, x_j) g(x_j)``, where ``theta``, ``phi`` and ``g``
are 1x1 convolutions to ``inter_channels``:

* ``embedded_gaussian``: ``f = softmax_j(theta(x_i)^T phi(x_j))`` (no ``1/sqrt(d)`` scale, as
  in the paper). Computed with the fused ``scaled_dot_product_attention``, which does not keep
  the ``(HW) x (HW)`` affinity where a memory-efficient kernel exists.
* ``dot_product``: ``f = theta(x_i)^T phi(x_j) / M`` with ``M`` the number of key positions
  (the positions the sum runs over). There is no softmax, so ``y = theta (phi^T g) / M`` is
  evaluated right-to-left in ``O(HW * d^2)`` memory, never forming the affinity.

``sub_sample=s`` max-pools the keys and values (``phi`` and ``g``) by ``s`` (paper, Sec. 3.3),
so the affinity is ``HW x ceil(H/s) ceil(W/s)``: memory ``(HW)^2 / s^2``. ``ceil_mode`` keeps
the last row/column of odd-sized maps.

By default the block starts as the exact identity: the last affine map of ``W_z`` (the norm's
scale and shift, or the conv when ``norm_layer=None``) is zeroed (paper, Sec. 4.1). Only that one
is zeroed; zeroing the conv as well would leave every gradient but the norm's shift at zero.

``zero_init=False`` starts the block as a working attention path instead. With the zero start,
``theta``, ``phi`` and ``g`` receive no gradient until the norm's scale has grown, and in a short
run (the tune stage's 4-epoch trials on cue-seg) the block never found the distant cue on 3 of 4
seeds; with a working start it found it in the first epoch on all 4
(``benchmarks/results/tune_points.md``). The paper's long ImageNet/Kinetics schedules can afford
the zero start; short budgets cannot.
"""

from __future__ import annotations

from typing import Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from ._conv import NormFactory
from ._registry import register_block

NonLocalMode = Literal["embedded_gaussian", "dot_product"]


def non_local_affinity(
    query: torch.Tensor, key: torch.Tensor, mode: NonLocalMode = "embedded_gaussian"
) -> torch.Tensor:
    """Pairwise affinity ``f`` of the non-local operation.

    Args:
        query: ``theta(x)`` as tokens, ``(B, N, d)``.
        key: ``phi(x)`` as tokens, ``(B, M, d)``.
        mode: ``"embedded_gaussian"`` (row-wise softmax) or ``"dot_product"`` (divided by ``M``).

    Returns:
        ``(B, N, M)`` weights; ``y = f @ g(x)``.
    """
    logits = query @ key.transpose(-2, -1)
    if mode == "embedded_gaussian":
        return logits.softmax(dim=-1)
    if mode == "dot_product":
        return logits / key.shape[-2]
    raise ValueError(f"mode must be 'embedded_gaussian' or 'dot_product', got {mode!r}")


class _AffineMap(Protocol):
    """The last affine map of ``W_z``: the norm, or the conv when there is none."""

    @property
    def weight(self) -> torch.Tensor: ...

    @property
    def bias(self) -> torch.Tensor | None: ...

    def reset_parameters(self) -> None: ...


@register_block("nonlocal")
class NonLocalBlock(nn.Module):
    """Residual non-local block on a ``(B, C, H, W)`` map, identity at initialisation.

    Args:
        channels: Channel count ``C``.
        inter_channels: Embedding width ``d`` of ``theta``/``phi``/``g``; default ``C // 2``
            (at least 1).
        mode: Pairwise function, ``"embedded_gaussian"`` or ``"dot_product"``.
        sub_sample: Max-pooling factor applied to keys and values; ``1`` disables it.
        norm_layer: Norm after the output conv ``W_z`` (``nn.BatchNorm2d`` in the paper);
            ``None`` for a biased conv only.
        zero_init: Start as the identity by zeroing ``W_z``'s last affine map (the paper);
            ``False`` keeps its default init, so the attention path learns from the first step.
    """

    def __init__(
        self,
        channels: int,
        inter_channels: int | None = None,
        mode: NonLocalMode = "embedded_gaussian",
        sub_sample: int = 1,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        if mode not in ("embedded_gaussian", "dot_product"):
            raise ValueError(f"mode must be 'embedded_gaussian' or 'dot_product', got {mode!r}")
        if sub_sample < 1:
            raise ValueError(f"sub_sample must be >= 1, got {sub_sample}")
        self.mode = mode
        self.zero_init = zero_init
        self.inter_channels = inter_channels or max(channels // 2, 1)
        d = self.inter_channels
        self.theta = nn.Conv2d(channels, d, 1)
        self.phi = nn.Conv2d(channels, d, 1)
        self.g = nn.Conv2d(channels, d, 1)
        self.pool = nn.MaxPool2d(sub_sample, ceil_mode=True) if sub_sample > 1 else nn.Identity()
        self.proj = nn.Conv2d(d, channels, 1, bias=norm_layer is None)
        self.norm = norm_layer(channels) if norm_layer is not None else nn.Identity()
        if zero_init and norm_layer is not None and getattr(self.norm, "weight", None) is None:
            raise ValueError("norm_layer must have an affine weight to start as the identity")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for conv in (self.theta, self.phi, self.g, self.proj):
            conv.reset_parameters()
        norm = None if isinstance(self.norm, nn.Identity) else cast(_AffineMap, self.norm)
        if norm is not None:
            norm.reset_parameters()
        if not self.zero_init:
            return
        # __init__ checked that the norm has an affine weight when zero_init is set
        last: _AffineMap = self.proj if norm is None else norm
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)

    def affinity(self, x: torch.Tensor) -> torch.Tensor:
        """The ``(B, HW, M)`` affinity ``f`` the block applies, for inspection.

        Args:
            x: Feature map ``(B, C, H, W)``.

        Returns:
            ``(B, H * W, M)`` with ``M = ceil(H / s) * ceil(W / s)`` key positions.
        """
        query = self._tokens(self.theta(x))
        key = self._tokens(self.pool(self.phi(x)))
        return non_local_affinity(query, key, self.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        query = self._tokens(self.theta(x))
        key = self._tokens(self.pool(self.phi(x)))
        value = self._tokens(self.pool(self.g(x)))
        if self.mode == "embedded_gaussian":
            # 4-D (B, 1, N, d) with a unit last stride: otherwise SDPA falls back to its math
            # path, which materialises the (HW)^2 affinity (10x the peak memory at 64x64).
            q, k, v = (t.unsqueeze(1).contiguous() for t in (query, key, value))
            y = F.scaled_dot_product_attention(q, k, v, scale=1.0).squeeze(1)
        else:
            y = query @ (key.transpose(1, 2) @ value) / key.shape[1]
        y = y.transpose(1, 2).reshape(B, self.inter_channels, H, W)
        return x + self.norm(self.proj(y))
