"""Global multi-head self-attention over tokens, and the attention math the other layers share.

Scaled dot-product attention (Vaswani et al. 2017, "Attention Is All You Need") over all
``N = H * W`` tokens of a feature map, as in ViT (Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words"): every token sees every other one, at ``O(N^2)`` time and memory.

Unlike the source article's sketch, q/k/v are moved to ``(B, heads, N, head_dim)`` before the
product (so attention mixes tokens, not heads), there is an output projection, and, as in
``timm.layers.Attention``, a fused ``F.scaled_dot_product_attention`` path sits beside a plain
one that materialises ``softmax(q k^T / sqrt(d)) v``. The plain path applies ``attn_drop`` to the
attention probabilities, so a forward hook on ``attn_drop`` sees the weights (attention rollout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import nn

from ._registry import register_block
from .token_block import TokenMixerBlock


def default_num_heads(dim: int, max_heads: int = 8, min_head_dim: int = 8) -> int:
    """Largest head count ``<= max_heads`` that divides ``dim`` with ``head_dim >= min_head_dim``.

    Falls back to 1 head when no count satisfies ``min_head_dim`` (tiny ``dim``).
    """
    for heads in range(min(max_heads, dim), 0, -1):
        if dim % heads == 0 and dim // heads >= min_head_dim:
            return heads
    return 1


def resolve_num_heads(dim: int, num_heads: int | None) -> int:
    """``num_heads``, or :func:`default_num_heads` when ``None``; checks it divides ``dim``."""
    if num_heads is None:
        return default_num_heads(dim)
    if num_heads <= 0 or dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must be positive and divide dim={dim}")
    return num_heads


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, ...]:
    """``(B, N, 3 * C)`` fused projections to q, k, v each ``(B, num_heads, N, C // num_heads)``."""
    B, N, C3 = qkv.shape
    head_dim = C3 // (3 * num_heads)
    return qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, head_dim)`` to ``(B, N, heads * head_dim)``."""
    B, heads, N, head_dim = x.shape
    return x.transpose(1, 2).reshape(B, N, heads * head_dim)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as an additive one (0 / -inf); float masks pass through."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -torch.inf)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout: nn.Module | None = None,
) -> torch.Tensor:
    """Reference math ``softmax(q k^T / sqrt(d) + mask) v`` with the weights materialised.

    Args:
        q: Queries ``(..., L, d)``.
        k: Keys ``(..., S, d)``.
        v: Values ``(..., S, d_v)``.
        attn_mask: Boolean (True = attend) or additive float mask broadcastable to
            ``(..., L, S)``. Every query must be allowed at least one key.
        dropout: Applied to the attention probabilities (e.g. an ``nn.Dropout``).

    Returns:
        ``(..., L, d_v)``.
    """
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        attn = attn + additive_mask(attn_mask, attn.dtype)
    attn = attn.softmax(dim=-1)
    if dropout is not None:
        attn = dropout(attn)
    return attn @ v


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    fused: bool,
    attn_drop: nn.Dropout | None = None,
) -> torch.Tensor:
    """Attention by ``F.scaled_dot_product_attention`` (``fused``) or :func:`softmax_attention`.

    Args:
        q, k, v, attn_mask: As in :func:`softmax_attention`.
        fused: Use the fused kernel (the weights are never materialised where the backend can
            avoid it).
        attn_drop: Dropout on the attention probabilities; in the fused path its rate is
            passed to the kernel while the module is training.
    """
    if not fused:
        return softmax_attention(q, k, v, attn_mask, attn_drop)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.to(q.dtype)
    p = attn_drop.p if attn_drop is not None and attn_drop.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)


class GlobalSelfAttention(nn.Module):
    """Multi-head self-attention over all tokens of a ``(B, N, C)`` sequence.

    Args:
        dim: Token channels ``C``.
        num_heads: Attention heads; must divide ``dim``. ``None`` picks
            :func:`default_num_heads`.
        qkv_bias: Bias in the q/k/v projection.
        qk_norm: Normalise q and k per head (``norm_layer`` over ``head_dim``) before the product.
        attn_drop: Dropout rate on the attention probabilities.
        proj_drop: Dropout rate after the output projection.
        norm_layer: Normalisation used by ``qk_norm``.
        fused_attn: Use ``F.scaled_dot_product_attention``; ``None`` follows
            ``timm.layers.use_fused_attn()``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = 8,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = resolve_num_heads(dim, num_heads)
        head_dim = dim // self.num_heads
        self.fused_attn = use_fused_attn() if fused_attn is None else fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend over all tokens.

        Args:
            x: Tokens ``(B, N, C)``.
            attn_mask: Boolean (True = attend) or additive float mask broadcastable to
                ``(B, heads, N, N)``; every query must be allowed at least one key.

        Returns:
            ``(B, N, C)``.
        """
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.q_norm(q), self.k_norm(k)
        out = attend(q, k, v, attn_mask, fused=self.fused_attn, attn_drop=self.attn_drop)
        return self.proj_drop(self.proj(merge_heads(out)))


@register_block("global_attn")
def global_attn(
    channels: int,
    *,
    num_heads: int | None = None,
    qkv_bias: bool = True,
    qk_norm: bool = False,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    fused_attn: bool | None = None,
    ls_init_value: float | None = 1e-5,
) -> TokenMixerBlock:
    """Pre-norm residual :class:`GlobalSelfAttention` over the ``H * W`` tokens of an NCHW map.

    ``num_heads=None`` picks :func:`default_num_heads` (works for any channel count).
    """
    mixer = GlobalSelfAttention(
        channels,
        num_heads=num_heads,
        qkv_bias=qkv_bias,
        qk_norm=qk_norm,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
        fused_attn=fused_attn,
    )
    return TokenMixerBlock(channels, mixer, layout="tokens", ls_init_value=ls_init_value)
