"""Window attention and shifted-window attention, after Swin (Liu et al. 2021, "Swin Transformer:
Hierarchical Vision Transformer using Shifted Windows").

Tokens attend within non-overlapping ``w x w`` windows (``O(N w^2)``), with a learned relative
position bias. Shifting the window grid by ``w // 2`` (a cyclic ``torch.roll``) lets consecutive
blocks exchange information across window boundaries; Swin's attention mask keeps tokens that
the roll brought together from opposite image edges apart. Sizes that are not multiples of the
window are padded, and padded keys are masked out (Swin lets real tokens attend to the zero
padding); a dimension no larger than the window becomes a single unshifted window, as in Swin.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, use_fused_attn
from torch import nn

from ._registry import register_block
from .attention import additive_mask, attend, merge_heads, resolve_num_heads, split_heads
from .token_block import TokenMixerBlock

Size2 = tuple[int, int]


def window_partition(x: torch.Tensor, window_size: int | Size2) -> torch.Tensor:
    """``(B, H, W, C)`` to windows ``(B * nW, wh * ww, C)``; H, W multiples of the window."""
    wh, ww = to_2tuple(window_size)
    B, H, W, C = x.shape
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, C)


def window_reverse(windows: torch.Tensor, window_size: int | Size2, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, wh * ww, C)`` to ``(B, H, W, C)``."""
    wh, ww = to_2tuple(window_size)
    C = windows.shape[-1]
    x = windows.view(-1, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def effective_window(size: Size2, window_size: Size2, shift_size: Size2) -> tuple[Size2, Size2]:
    """Swin's clamping: a dimension no larger than the window is one window, unshifted."""
    (h, w), (wh, ww), (sh, sw) = size, window_size, shift_size
    return (min(h, wh), min(w, ww)), (0 if h <= wh else sh, 0 if w <= ww else sw)


def relative_position_index(window_size: Size2, table_window: Size2 | None = None) -> torch.Tensor:
    """Index ``(N, N)`` into a ``(2Wh-1)(2Ww-1)`` relative-offset table (Swin).

    Args:
        window_size: Window ``(wh, ww)`` with ``N = wh * ww`` tokens.
        table_window: Window ``(Wh, Ww)`` the table was built for (``>= window_size``);
            defaults to ``window_size``. A smaller window indexes the same table.
    """
    wh, ww = window_size
    Wh, Ww = table_window or window_size
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    rel = coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]  # (2, N, N)
    return (rel[0] + Wh - 1) * (2 * Ww - 1) + (rel[1] + Ww - 1)


def window_attention_mask(
    size: Size2, window_size: Size2, shift_size: Size2, device: torch.device | None = None
) -> torch.Tensor:
    """Which keys each query may attend to, per window of the padded, rolled map.

    A query attends to a key of its window iff both come from the same region of Swin's shift
    mask (so the roll never joins opposite edges) and the key is a real (not padded) token; a
    padded query keeps itself so that no row is empty.

    Args:
        size: Unpadded ``(H, W)``.
        window_size: Window ``(wh, ww)``, at most ``(H, W)``.
        shift_size: Cyclic shift ``(sh, sw)``, ``0 <= shift < window``.
        device: Where to build the mask.

    Returns:
        Boolean ``(nW, N, N)``, True = attend, ``N = wh * ww``, windows ordered as in
        :func:`window_partition`.
    """
    H, W = size
    Hp, Wp = (-(-s // w) * w for s, w in zip(size, window_size, strict=True))
    labels = torch.zeros(Hp, Wp, dtype=torch.long, device=device)
    regions = [
        (slice(0, -w), slice(-w, -s), slice(-s, None)) if s else (slice(None),)
        for w, s in zip(window_size, shift_size, strict=True)
    ]
    for i, hs in enumerate(regions[0]):
        for j, ws in enumerate(regions[1]):
            labels[hs, ws] = i * 3 + j
    real = torch.zeros(Hp, Wp, dtype=torch.bool, device=device)
    real[:H, :W] = True
    real = torch.roll(real, shifts=(-shift_size[0], -shift_size[1]), dims=(0, 1))
    labels = window_partition(labels[None, :, :, None], window_size)[..., 0]  # (nW, N)
    real = window_partition(real[None, :, :, None], window_size)[..., 0]
    eye = torch.eye(labels.shape[1], dtype=torch.bool, device=device)
    return (labels[:, :, None] == labels[:, None, :]) & (real[:, None, :] | eye)


def windowed_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    fused: bool,
    attn_drop: nn.Dropout | None = None,
) -> torch.Tensor:
    """Attention inside windows with a per-head bias and an optional per-window mask.

    Windows are folded into the head axis, so the mask broadcasts over the batch without a copy.

    Args:
        q: ``(B * nW, heads, N, d)``.
        k, v: ``(B * nW, heads, M, d)``.
        bias: Additive ``(heads, N, M)`` (relative position bias).
        mask: Boolean (True = attend) or additive ``(nW, N, M)``, or ``None``.
        fused, attn_drop: As in :func:`gattn.modules.attention.attend`.

    Returns:
        ``(B * nW, heads, N, d)``.
    """
    if mask is None:
        return attend(q, k, v, bias.unsqueeze(0), fused=fused, attn_drop=attn_drop)
    nW, heads = mask.shape[0], q.shape[1]
    attn_mask = additive_mask(mask, bias.dtype).unsqueeze(1) + bias  # (nW, heads, N, M)
    attn_mask = attn_mask.reshape(1, nW * heads, *attn_mask.shape[-2:])
    q, k, v = (t.reshape(-1, nW * heads, *t.shape[-2:]) for t in (q, k, v))
    out = attend(q, k, v, attn_mask, fused=fused, attn_drop=attn_drop)
    return out.reshape(-1, heads, *out.shape[-2:])


class RelativePositionBias(nn.Module):
    """Swin's learned bias per head and relative offset inside a window.

    Args:
        window_size: Largest window ``(Wh, Ww)``; smaller windows index the same table.
        num_heads: Attention heads.
    """

    relative_position_index: torch.Tensor  # non-persistent buffer

    def __init__(self, window_size: Size2, num_heads: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        size = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.empty(size, num_heads))
        self.register_buffer(
            "relative_position_index", relative_position_index(window_size), persistent=False
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, window_size: Size2 | None = None) -> torch.Tensor:
        """Bias ``(heads, N, N)`` for a window of ``window_size`` (default: the full window)."""
        window_size = window_size or self.window_size
        index = self.relative_position_index
        if tuple(window_size) != tuple(self.window_size):
            index = relative_position_index(window_size, self.window_size).to(index.device)
        N = index.shape[0]
        bias = self.relative_position_bias_table[index.reshape(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows ``(B * nW, wh * ww, C)`` with relative bias.

    Args:
        dim: Token channels ``C``.
        window_size: Window side, or ``(wh, ww)``.
        num_heads: Attention heads; ``None`` picks a default dividing ``dim``.
        qkv_bias: Bias in the q/k/v projection.
        attn_drop: Dropout rate on the attention probabilities.
        proj_drop: Dropout rate after the output projection.
        fused_attn: Use ``F.scaled_dot_product_attention``; ``None`` follows timm.
    """

    def __init__(
        self,
        dim: int,
        window_size: int | Size2 = 7,
        num_heads: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        self.window_size = to_2tuple(window_size)
        if min(self.window_size) <= 0:
            raise ValueError(f"window_size must be positive, got {window_size}")
        self.num_heads = resolve_num_heads(dim, num_heads)
        self.fused_attn = use_fused_attn() if fused_attn is None else fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.rel_pos = RelativePositionBias(self.window_size, self.num_heads)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        window_size: Size2 | None = None,
    ) -> torch.Tensor:
        """Attend within each window.

        Args:
            x: Windows ``(B * nW, N, C)``.
            mask: Boolean (True = attend) or additive ``(nW, N, N)``, or ``None``.
            window_size: Actual window ``(wh, ww)`` when smaller than the configured one.

        Returns:
            ``(B * nW, N, C)``.
        """
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        bias = self.rel_pos(window_size)
        out = windowed_attend(q, k, v, bias, mask, fused=self.fused_attn, attn_drop=self.attn_drop)
        return self.proj_drop(self.proj(merge_heads(out)))


class ShiftedWindowAttention(nn.Module):
    """(Shifted-)window attention on tokens laid out ``(B, H, W, C)``, any ``H, W``.

    Args:
        dim: Token channels ``C``.
        window_size: Window side.
        shift_size: Cyclic shift; ``None`` is ``window_size // 2``, ``0`` plain windows.
        num_heads, qkv_bias, attn_drop, proj_drop, fused_attn: As in :class:`WindowAttention`.
    """

    def __init__(
        self,
        dim: int,
        window_size: int = 7,
        shift_size: int | None = None,
        num_heads: int | None = None,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool | None = None,
    ) -> None:
        super().__init__()
        shift_size = window_size // 2 if shift_size is None else shift_size
        if not 0 <= shift_size < window_size:
            msg = "need window_size > 0 and 0 <= shift_size < window_size"
            msg += f", got {window_size=}, {shift_size=}"
            raise ValueError(msg)
        self.window_size = (window_size, window_size)
        self.shift_size = (shift_size, shift_size)
        self.attn = WindowAttention(
            dim, window_size, num_heads, qkv_bias, attn_drop, proj_drop, fused_attn
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` to ``(B, H, W, C)``."""
        B, H, W, C = x.shape
        window, shift = effective_window((H, W), self.window_size, self.shift_size)
        pad_h, pad_w = (-H) % window[0], (-W) % window[1]
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        needs_mask = pad_h or pad_w or any(shift)
        mask = window_attention_mask((H, W), window, shift, x.device) if needs_mask else None
        out = self.attn(window_partition(x, window), mask, window)
        out = window_reverse(out, window, H + pad_h, W + pad_w)
        out = torch.roll(out, shifts=shift, dims=(1, 2))
        return out[:, :H, :W]


@register_block("shifted_window_attn")
def shifted_window_attn(
    channels: int,
    *,
    window_size: int = 7,
    shift_size: int | None = None,
    num_heads: int | None = None,
    qkv_bias: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    fused_attn: bool | None = None,
    ls_init_value: float | None = 1e-5,
) -> TokenMixerBlock:
    """Pre-norm residual shifted-window attention (shift ``window_size // 2``) on an NCHW map."""
    mixer = ShiftedWindowAttention(
        channels, window_size, shift_size, num_heads, qkv_bias, attn_drop, proj_drop, fused_attn
    )
    return TokenMixerBlock(channels, mixer, layout="nhwc", ls_init_value=ls_init_value)


@register_block("window_attn")
def window_attn(
    channels: int,
    *,
    window_size: int = 7,
    num_heads: int | None = None,
    qkv_bias: bool = True,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    fused_attn: bool | None = None,
    ls_init_value: float | None = 1e-5,
) -> TokenMixerBlock:
    """Pre-norm residual window attention without shift on an NCHW map."""
    return shifted_window_attn(
        channels,
        window_size=window_size,
        shift_size=0,
        num_heads=num_heads,
        qkv_bias=qkv_bias,
        attn_drop=attn_drop,
        proj_drop=proj_drop,
        fused_attn=fused_attn,
        ls_init_value=ls_init_value,
    )
