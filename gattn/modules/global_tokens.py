"""Window attention plus a few learned global tokens that see, and are seen by, every token.

Global tokens follow Longformer (Beltagy et al. 2020, "Longformer: The Long-Document
Transformer"), BigBird (Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences") and
the Memory Transformer (Burtsev et al. 2020): local attention keeps the cost linear in the token
count ``N`` while ``g`` global tokens carry information across the whole image. Windows and
their relative position bias are Swin's (Liu et al. 2021).

One block runs two steps, never forming an ``N x N`` matrix:

1. the ``g`` global tokens attend to all ``N`` tokens and to themselves, and are updated
   (``O(N g)``);
2. every token attends to the tokens of its own ``w x w`` window plus the ``g`` updated global
   tokens (``O(N (w^2 + g))``).

So any token can influence any other within one block, through the global tokens. (The source
article's sketch concatenated the global tokens to all tokens and ran full ``O(N^2)`` attention.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, use_fused_attn
from torch import nn

from ._registry import register_block
from .attention import attend, merge_heads, resolve_num_heads, split_heads
from .token_block import TokenMixerBlock
from .window_attention import (
    RelativePositionBias,
    effective_window,
    window_attention_mask,
    window_partition,
    window_reverse,
    windowed_attend,
)


class GlobalTokenAttention(nn.Module):
    """Window attention with ``num_global_tokens`` learned global tokens on ``(B, H, W, C)``.

    Sizes that are not multiples of the window are padded and the padded keys masked out; a
    dimension smaller than the window becomes one window. q/k/v of tokens and global tokens
    share one projection, as memory tokens do in the Memory Transformer.

    Args:
        dim: Token channels ``C``.
        window_size: Window side.
        num_global_tokens: Learned global tokens ``g``; ``0`` is plain window attention.
        num_heads: Attention heads; ``None`` picks a default dividing ``dim``.
        qkv_bias: Bias in the q/k/v projection.
        attn_drop: Dropout rate on the attention probabilities (both steps).
        proj_drop: Dropout rate after the output projection.
        fused_attn: Use ``F.scaled_dot_product_attention``; ``None`` follows timm.
    """

    def __init__(
        self,
        dim: int,
        window_size: int = 7,
        num_global_tokens: int = 4,
        num_heads: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        if window_size <= 0 or num_global_tokens < 0:
            msg = "need window_size > 0 and num_global_tokens >= 0"
            raise ValueError(f"{msg}, got {window_size=}, {num_global_tokens=}")
        self.window_size = to_2tuple(window_size)
        self.num_global_tokens = num_global_tokens
        self.num_heads = resolve_num_heads(dim, num_heads)
        self.fused_attn = use_fused_attn() if fused_attn is None else fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rel_pos = RelativePositionBias(self.window_size, self.num_heads)
        self.global_tokens = nn.Parameter(torch.empty(1, num_global_tokens, dim))
        self.global_proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.global_tokens.numel():
            nn.init.trunc_normal_(self.global_tokens, std=0.02)

    def update_global(self, qkv: torch.Tensor, global_tokens: torch.Tensor) -> torch.Tensor:
        """Step 1: global tokens attend to all tokens and themselves, residually updated.

        Args:
            qkv: Projected tokens ``(B, N, 3 * C)``.
            global_tokens: ``(B, g, C)``.

        Returns:
            Updated global tokens ``(B, g, C)``.
        """
        q_g, k_g, v_g = split_heads(self.qkv(global_tokens), self.num_heads)
        _, k, v = split_heads(qkv, self.num_heads)
        k, v = torch.cat([k_g, k], dim=2), torch.cat([v_g, v], dim=2)
        out = attend(q_g, k, v, fused=self.fused_attn, attn_drop=self.attn_drop)
        return global_tokens + self.global_proj(merge_heads(out))

    def forward(
        self,
        x: torch.Tensor,
        global_tokens: torch.Tensor | None = None,
        return_global: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Global-token update, then window attention with the global tokens as extra keys.

        Args:
            x: Tokens ``(B, H, W, C)``.
            global_tokens: ``(B or 1, g', C)`` to use instead of the learned ones (e.g. tokens
                fed back from another block or another crop).
            return_global: Also return the updated global tokens.

        Returns:
            ``(B, H, W, C)``, and the updated global tokens ``(B, g, C)`` if ``return_global``.
        """
        B, H, W, C = x.shape
        window, _ = effective_window((H, W), self.window_size, (0, 0))
        qkv = self.qkv(x)
        g = self.global_tokens if global_tokens is None else global_tokens
        g = g.expand(B, -1, -1)
        num_global = g.shape[1]
        if num_global:
            g = self.update_global(qkv.reshape(B, H * W, 3 * C), g)

        pad_h, pad_w = (-H) % window[0], (-W) % window[1]
        qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
        q, k, v = split_heads(window_partition(qkv, window), self.num_heads)
        mask = None
        if pad_h or pad_w:
            mask = window_attention_mask((H, W), window, (0, 0), x.device)
        bias = self.rel_pos(window)
        if num_global:
            num_windows = q.shape[0] // B
            _, k_g, v_g = split_heads(self.qkv(g), self.num_heads)
            k = torch.cat([k, k_g.repeat_interleave(num_windows, dim=0)], dim=2)
            v = torch.cat([v, v_g.repeat_interleave(num_windows, dim=0)], dim=2)
            bias = F.pad(bias, (0, num_global))
            mask = None if mask is None else F.pad(mask, (0, num_global), value=True)
        out = windowed_attend(q, k, v, bias, mask, fused=self.fused_attn, attn_drop=self.attn_drop)
        out = window_reverse(merge_heads(out), window, H + pad_h, W + pad_w)[:, :H, :W]
        out = self.proj_drop(self.proj(out))
        return (out, g) if return_global else out


@register_block("global_tokens")
def global_tokens(
    channels: int,
    *,
    window_size: int = 7,
    num_global_tokens: int = 4,
    num_heads: int | None = None,
    qkv_bias: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    fused_attn: bool | None = None,
    ls_init_value: float | None = 1e-5,
) -> TokenMixerBlock:
    """Pre-norm residual :class:`GlobalTokenAttention` on an NCHW map."""
    mixer = GlobalTokenAttention(
        channels,
        window_size=window_size,
        num_global_tokens=num_global_tokens,
        num_heads=num_heads,
        qkv_bias=qkv_bias,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
        fused_attn=fused_attn,
    )
    return TokenMixerBlock(channels, mixer, layout="nhwc", ls_init_value=ls_init_value)
