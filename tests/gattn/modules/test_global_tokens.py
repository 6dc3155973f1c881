"""GlobalTokenAttention: the two-step math, global reach in one block, linear-size scores."""

from __future__ import annotations

import pytest
import torch

from gattn.modules.global_tokens import GlobalTokenAttention
from gattn.modules.window_attention import ShiftedWindowAttention

C, HEADS, WIN = 16, 2, 4


def _module(num_global: int = 3, fused: bool = True) -> GlobalTokenAttention:
    torch.manual_seed(0)
    m = GlobalTokenAttention(C, WIN, num_global, HEADS, fused_attn=fused).double().eval()
    with torch.no_grad():  # make the relative position bias and the global tokens matter
        m.rel_pos.relative_position_bias_table.normal_()
        m.global_tokens.normal_()
    return m


def _softmax_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias=0.0) -> torch.Tensor:
    """Per-head attention written out: q (B, L, h, d), k/v (B, S, h, d) -> (B, L, h * d)."""
    scores = torch.einsum("blhd,bshd->bhls", q, k) / q.shape[-1] ** 0.5 + bias
    out = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), v)
    return out.flatten(2)


def _reference(m: GlobalTokenAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The design written with loops over windows, crops instead of padding and masks."""
    B, H, W, _ = x.shape

    def split(t: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (..., 3C) -> q, k, v (..., h, d)
        return t.unflatten(-1, (3, HEADS, -1)).unbind(-3)

    q, k, v = split(m.qkv(x).reshape(B, H * W, 3 * C))
    g = m.global_tokens.expand(B, -1, -1)
    q_g, k_g, v_g = split(m.qkv(g))
    g = g + m.global_proj(
        _softmax_attend(q_g, torch.cat([k_g, k], 1), torch.cat([v_g, v], 1))
    )  # step 1: global tokens read everything
    _, k_g, v_g = split(m.qkv(g))
    qkv = m.qkv(x)
    out = torch.zeros_like(x)
    for r in range(0, H, WIN):
        for c in range(0, W, WIN):
            crop = qkv[:, r : r + WIN, c : c + WIN]
            h, w = crop.shape[1:3]
            q, k, v = split(crop.reshape(B, h * w, 3 * C))
            bias = torch.nn.functional.pad(m.rel_pos((h, w)), (0, g.shape[1]))
            o = _softmax_attend(q, torch.cat([k, k_g], 1), torch.cat([v, v_g], 1), bias)
            out[:, r : r + h, c : c + w] = o.reshape(B, h, w, C)  # step 2: window + globals
    return m.proj(out), g


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("size", [(8, 12), (9, 11), (3, 2), (17, 23)])
def test_matches_loop_reference(fused: bool, size: tuple[int, int]) -> None:
    m = _module(fused=fused)
    x = torch.randn(2, *size, C, dtype=torch.float64)
    with torch.no_grad():
        out, g = m(x, return_global=True)
        ref_out, ref_g = _reference(m, x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(g, ref_g)


@pytest.mark.parametrize("num_global", [0, 3])
@pytest.mark.parametrize("size", [(8, 8), (9, 11)])
def test_fused_and_plain_paths_agree(num_global: int, size: tuple[int, int]) -> None:
    fused, plain = _module(num_global, True), _module(num_global, False)
    x = torch.randn(2, *size, C, dtype=torch.float64)
    torch.testing.assert_close(fused(x), plain(x))


def _dependence(m: GlobalTokenAttention, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) map of |d out[-1, -1] / d x| summed over channels and batch."""
    x = torch.randn(1, *size, C, dtype=torch.float64, requires_grad=True)
    m(x)[:, -1, -1].sum().backward()
    return x.grad.abs().sum(dim=(0, 3))


@pytest.mark.parametrize("fused", [True, False])
def test_every_token_reaches_every_other_in_one_block(fused: bool) -> None:
    dep = _dependence(_module(3, fused), (13, 10))
    assert (dep > 0).all()  # including the far corner (0, 0)


def test_without_global_tokens_dependence_stays_in_the_window() -> None:
    dep = _dependence(_module(0), (13, 10))
    expected = torch.zeros(13, 10, dtype=torch.bool)
    expected[12:, 8:] = True  # the bottom-right window is the 1x2 real part of a padded one
    assert torch.equal(dep > 0, expected)


def test_no_global_tokens_equals_padded_window_attention() -> None:
    ours = _module(0, fused=False)
    windows = ShiftedWindowAttention(C, WIN, 0, HEADS, fused_attn=False).double().eval()
    shared = {k: v for k, v in ours.state_dict().items() if not k.startswith("global")}
    windows.attn.load_state_dict(shared)
    x = torch.randn(2, 9, 11, C, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), windows(x))


def test_never_materialises_an_n_by_n_matrix() -> None:
    m = _module(4, fused=False)
    shapes: list[tuple[int, ...]] = []  # (batch * heads * windows, queries, keys)
    m.attn_drop.register_forward_hook(
        lambda mod, i, o: shapes.append((o.shape[:-2].numel(), *o.shape[-2:]))
    )
    for B, H, W in [(2, 16, 12), (2, 15, 10)]:  # without and with padding
        shapes.clear()
        m(torch.randn(B, H, W, C, dtype=torch.float64))
        n_windows = -(-H // WIN) * -(-W // WIN)
        assert shapes == [
            (B * HEADS, 4, 4 + H * W),  # step 1: g queries over g + N keys
            (B * HEADS * n_windows, WIN * WIN, WIN * WIN + 4),  # step 2: window + g keys
        ]


def test_external_global_tokens_and_return_global() -> None:
    m = _module(3)
    x = torch.randn(2, 8, 8, C, dtype=torch.float64)
    fed = torch.randn(2, 5, C, dtype=torch.float64)
    with torch.no_grad():
        out, g = m(x, global_tokens=fed, return_global=True)
        out_learned = m(x)
    assert out.shape == x.shape and g.shape == (2, 5, C)
    assert not torch.allclose(out, out_learned)  # the fed tokens are used
    assert not torch.allclose(g, fed)  # ... and updated


def test_global_tokens_are_trained() -> None:
    m = GlobalTokenAttention(C, WIN, 2, HEADS)
    m(torch.randn(1, 9, 9, C)).square().sum().backward()
    assert m.global_tokens.grad is not None and m.global_tokens.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", [{"window_size": 0}, {"num_global_tokens": -1}])
def test_bad_arguments_are_clear_errors(kw: dict) -> None:
    with pytest.raises(ValueError, match="window_size"):
        GlobalTokenAttention(C, **{"num_heads": HEADS, **kw})
