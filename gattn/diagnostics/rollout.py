"""Attention rollout: how much each input token flows into each output token of a transformer.

Paper: Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers" (ACL),
https://arxiv.org/abs/2005.00928. Per layer, the heads' attention ``A`` is fused (mean, max or
min over heads), the residual connection is accounted for as ``0.5 * (A + I)``, rows are
re-normalised to sum to one, and the layers are multiplied:
``R = Â_L ... Â_2 Â_1``. ``discard_ratio`` zeroes the weakest fused weights of each layer
first, as in the reference implementation by Jacob Gildenblat (``vit_rollout.py``).

Unlike the source article's ``visualize_attention_rollout``: the identity and the
re-normalisation are there, and the weights are captured from fused-attention models (timm's
``Attention`` and :class:`~gattn.modules.attention.GlobalSelfAttention` run
``F.scaled_dot_product_attention``, which never exposes them): every module with a
``fused_attn`` flag is switched to its plain path for the pass, a forward hook on its
``attn_drop`` (applied to the probabilities) records them, and the flags are restored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol, cast

import torch
from torch import nn

HeadFusion = Literal["mean", "max", "min"]


def fuse_heads(attention: torch.Tensor, head_fusion: HeadFusion = "mean") -> torch.Tensor:
    """``(B, heads, N, N)`` attention to ``(B, N, N)`` by mean, max or min over heads."""
    if head_fusion == "mean":
        return attention.mean(dim=1)
    if head_fusion == "max":
        return attention.amax(dim=1)
    if head_fusion == "min":
        return attention.amin(dim=1)
    raise ValueError(f"head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")


def discard_lowest(attention: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the ``int(N * N * discard_ratio)`` smallest weights of each ``(N, N)`` matrix.

    As in the reference implementation, the ranking is over the whole matrix and the first
    entry (the class token attending to itself, when there is one) is never dropped; the
    reference applied it to the first image only, here every image of the batch gets its own.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
    B, N, _ = attention.shape
    count = int(N * N * discard_ratio)
    if count == 0:
        return attention
    flat = attention.reshape(B, N * N).clone()
    lowest = flat.topk(count, dim=-1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
    drop[:, 0] = False
    return flat.masked_fill(drop, 0.0).view(B, N, N)


def rollout(
    attentions: Sequence[torch.Tensor],
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Rollout ``(B, N, N)`` of per-layer attention ``(B, heads, N, N)``, first layer first.

    Row ``i`` is the share of each input token in output token ``i``; rows sum to one.
    """
    if not attentions:
        raise ValueError("rollout needs at least one layer of attention")
    B, _, N, _ = attentions[0].shape
    eye = torch.eye(N, device=attentions[0].device, dtype=torch.float64)
    result = eye.expand(B, N, N)
    for attention in attentions:
        if attention.shape[-2:] != (N, N):
            raise ValueError(
                f"layers attend over different token counts: {N} and {attention.shape[-1]}"
            )
        fused = discard_lowest(fuse_heads(attention.double(), head_fusion), discard_ratio)
        a = 0.5 * (fused + eye)
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result.to(attentions[0].dtype)


class _AttentionLayer(Protocol):
    """What :func:`capture_attention` needs of a layer (timm's attention layers have both)."""

    fused_attn: bool
    attn_drop: nn.Module


def capture_attention(model: nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities ``(B, heads, N, N)`` of every attention layer, in call order.

    Layers are the modules with a ``fused_attn`` attribute and an ``attn_drop`` child (timm's
    ``Attention``, :class:`~gattn.modules.attention.GlobalSelfAttention`); their fused path is
    switched off for the pass and restored afterwards, also on error.
    """
    layers = [
        cast(_AttentionLayer, m)
        for m in model.modules()
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
    ]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layer with an attn_drop")
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        captured.append(output.detach())

    saved = [m.fused_attn for m in layers]
    handles = [m.attn_drop.register_forward_hook(hook) for m in layers]
    try:
        for m in layers:
            m.fused_attn = False
        with torch.no_grad():
            model(image)
    finally:
        for m, flag in zip(layers, saved, strict=True):
            m.fused_attn = flag
        for handle in handles:
            handle.remove()
    return captured


def attention_rollout(
    model: nn.Module,
    image: torch.Tensor,
    head_fusion: HeadFusion = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Rollout ``(B, N, N)`` of ``model`` on ``image`` (see :func:`rollout`).

    Args:
        model: A transformer whose attention layers :func:`capture_attention` finds (a timm
            ViT, ``gattn_vit_global``, or a model built from them); put it in eval mode.
        image: Images ``(B, C, H, W)``.
        head_fusion: How heads are merged per layer: ``"mean"``, ``"max"`` or ``"min"``.
        discard_ratio: Fraction of the weakest fused weights zeroed per layer.

    Use :func:`rollout_map` for a ``(B, h, w)`` map over the patch grid.
    """
    return rollout(capture_attention(model, image), head_fusion, discard_ratio)


def rollout_map(
    result: torch.Tensor,
    num_prefix_tokens: int = 0,
    grid_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Per-patch relevance ``(B, h, w)`` from a rollout ``(B, N, N)``, maximum 1 per image.

    With a class token (``num_prefix_tokens >= 1``, token 0 is the class token) this is its
    row over the patch columns; without one (average-pooled ViTs) it is the mean over all
    rows, the share of each patch in the pooled output.

    Args:
        result: Rollout from :func:`attention_rollout`.
        num_prefix_tokens: Class/register tokens before the patch tokens (timm's
            ``model.num_prefix_tokens``).
        grid_size: Patch grid ``(h, w)``; ``None`` assumes a square grid.
    """
    rows = result[:, 0] if num_prefix_tokens else result.mean(dim=1)
    patches = rows[:, num_prefix_tokens:]
    n = patches.shape[-1]
    if grid_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patch tokens are not a square grid; pass grid_size")
        grid_size = (side, side)
    maps = patches.reshape(-1, *grid_size)
    return maps / maps.amax(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
