"""Window / shifted-window attention: partitioning, Swin parity, masks, padding, locality."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention

from gattn.modules.window_attention import (
    ShiftedWindowAttention,
    WindowAttention,
    relative_position_index,
    window_attention_mask,
    window_partition,
    window_reverse,
)

C, HEADS, WIN = 16, 2, 7


def _module(shift: int, fused: bool = True, window: int = WIN) -> ShiftedWindowAttention:
    torch.manual_seed(0)
    m = ShiftedWindowAttention(C, window, shift, HEADS, fused_attn=fused).double().eval()
    with torch.no_grad():  # make the relative position bias matter
        m.attn.rel_pos.relative_position_bias_table.normal_()
    return m


def _changed(m: ShiftedWindowAttention, x: torch.Tensor, at: tuple[int, int]) -> torch.Tensor:
    """(H, W) map of which outputs move when the token at ``at`` is perturbed."""
    x2 = x.clone()
    x2[:, at[0], at[1]] += 5.0
    with torch.no_grad():
        return (m(x2) - m(x)).abs().amax(dim=(0, 3)) > 1e-9


def test_partition_and_reverse_are_inverse_and_keep_blocks() -> None:
    x = torch.randn(2, 6, 8, 3)
    windows = window_partition(x, (3, 4))
    assert windows.shape == (2 * 2 * 2, 12, 3)
    torch.testing.assert_close(windows[3], x[0, 3:6, 4:8].reshape(12, 3))  # window (1, 1)
    torch.testing.assert_close(windows[4], x[1, 0:3, 0:4].reshape(12, 3))
    torch.testing.assert_close(window_reverse(windows, (3, 4), 6, 8), x)


def test_relative_position_index_depends_only_on_offset() -> None:
    full = relative_position_index((5, 5))
    coords = torch.cartesian_prod(torch.arange(5), torch.arange(5))
    offsets = coords[:, None] - coords[None]  # (N, N, 2)
    keys = offsets[..., 0] * 100 + offsets[..., 1]
    for key in keys.unique():
        assert full[keys == key].unique().numel() == 1  # same offset, same entry
    assert full.unique().numel() == keys.unique().numel() == 9 * 9  # different offsets differ
    small = relative_position_index((3, 2), (5, 5))  # a clamped window indexes the same table
    sub = torch.tensor([r * 5 + c for r in range(3) for c in range(2)])
    torch.testing.assert_close(small, full[sub][:, sub])


@pytest.mark.parametrize("shift", [0, 3])
def test_matches_timm_swin_window_attention(shift: int) -> None:
    torch.manual_seed(0)
    ours = WindowAttention(C, WIN, HEADS, fused_attn=False).double().eval()
    ref = TimmWindowAttention(C, HEADS, window_size=WIN).double().eval()
    with torch.no_grad():
        ours.rel_pos.relative_position_bias_table.normal_()
        ref.qkv.load_state_dict(ours.qkv.state_dict())
        ref.proj.load_state_dict(ours.proj.state_dict())
        ref.relative_position_bias_table.copy_(ours.rel_pos.relative_position_bias_table)
    swin = SwinTransformerBlock(C, (14, 14), HEADS, window_size=WIN, shift_size=shift)
    ref_mask = None if swin.attn_mask is None else swin.attn_mask.double()
    mask = window_attention_mask((14, 14), (WIN, WIN), (shift, shift)) if shift else None
    x = torch.randn(2 * 4, WIN * WIN, C, dtype=torch.float64)
    torch.testing.assert_close(ours(x, mask), ref(x, ref_mask))


@pytest.mark.parametrize("size,shift", [((14, 14), 3), ((37, 53), 3), ((9, 16), 2), ((10, 9), 0)])
def test_mask_matches_independent_definition(size: tuple[int, int], shift: int) -> None:
    """Attend iff not wrapped by the roll (|offset| < window) and the key is real (or self)."""
    H, W = size
    mask = window_attention_mask(size, (WIN, WIN), (shift, shift))
    Hp, Wp = -(-H // WIN) * WIN, -(-W // WIN) * WIN
    grid = torch.stack(torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij"), -1)
    grid = torch.roll(grid, (-shift, -shift), (0, 1))
    pos = window_partition(grid[None], WIN)  # (nW, N, 2) original coordinates
    near = ((pos[:, :, None] - pos[:, None]).abs() < WIN).all(-1)
    real = (pos[..., 0] < H) & (pos[..., 1] < W)
    expected = near & (real[:, None, :] | torch.eye(WIN * WIN, dtype=torch.bool))
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("shift", [0, 3])
@pytest.mark.parametrize("size", [(14, 14), (37, 53), (3, 5)])
def test_fused_and_plain_paths_agree(shift: int, size: tuple[int, int]) -> None:
    fused, plain = _module(shift, True), _module(shift, False)
    x = torch.randn(2, *size, C, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))


@pytest.mark.parametrize("fused", [True, False])
def test_windows_never_mix(fused: bool) -> None:
    m = _module(0, fused)
    x = torch.randn(1, 14, 14, C, dtype=torch.float64)
    changed = _changed(m, x, (2, 3))
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[:7, :7] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_shift_never_joins_opposite_edges(fused: bool) -> None:
    m = _module(3, fused)
    x = torch.randn(1, 14, 14, C, dtype=torch.float64)
    changed = _changed(m, x, (0, 0))
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[:3, :3] = True  # the corner's rolled window holds only its own 3x3 region
    assert torch.equal(changed, expected)
    assert not changed[-1].any() and not changed[:, -1].any()


def test_shift_mixes_across_unshifted_window_boundary() -> None:
    x = torch.randn(1, 14, 14, C, dtype=torch.float64)
    shifted, plain = _module(3), _module(0)
    plain.load_state_dict(shifted.state_dict())
    assert _changed(shifted, x, (5, 5))[8, 8]  # (5, 5) and (8, 8) share a shifted window
    assert not _changed(plain, x, (5, 5))[8, 8]  # ... but not an unshifted one


# Regions of a 37x53 map that form one attention unit each: (rows, cols) in original coordinates.
UNITS = {
    0: [((0, 7), (0, 7)), ((35, 37), (49, 53)), ((35, 37), (0, 7))],
    3: [((3, 10), (3, 10)), ((31, 37), (45, 52)), ((0, 3), (0, 3)), ((0, 3), (52, 53)),
        ((31, 37), (52, 53))],
}  # fmt: skip


@pytest.mark.parametrize("shift", [0, 3])
def test_padding_does_not_leak_into_real_tokens(shift: int) -> None:
    """Each (partial, padded or wrapped) window equals attention on its real tokens alone."""
    m = _module(shift)
    x = torch.randn(2, 37, 53, C, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        for (r0, r1), (c0, c1) in UNITS[shift]:
            h, w = r1 - r0, c1 - c0
            crop = x[:, r0:r1, c0:c1].reshape(2, h * w, C)
            expected = m.attn(crop, None, (h, w)).reshape(2, h, w, C)
            torch.testing.assert_close(y[:, r0:r1, c0:c1], expected)


@pytest.mark.parametrize("shift", [0, 3])
def test_image_smaller_than_window_is_one_unshifted_window(shift: int) -> None:
    m = _module(shift)
    x = torch.randn(2, 3, 5, C, dtype=torch.float64)
    with torch.no_grad():
        expected = m.attn(x.reshape(2, 15, C), None, (3, 5)).reshape(2, 3, 5, C)
        torch.testing.assert_close(m(x), expected)


@pytest.mark.parametrize("fused", [True, False])
def test_relative_position_bias_is_trained(fused: bool) -> None:
    m = ShiftedWindowAttention(C, WIN, 3, HEADS, fused_attn=fused)
    m(torch.randn(1, 17, 12, C)).square().sum().backward()
    grad = m.attn.rel_pos.relative_position_bias_table.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("window,shift", [(0, None), (-3, 0), (7, 7), (7, -1)])
def test_impossible_window_is_a_clear_error(window: int, shift: int | None) -> None:
    with pytest.raises(ValueError, match="window_size"):
        ShiftedWindowAttention(C, window, shift, HEADS)
