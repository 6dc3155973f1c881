"""GlobalSelfAttention: fused/plain parity, equality with nn.MultiheadAttention, masking."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gattn.modules._registry import create
from gattn.modules.attention import (
    GlobalSelfAttention,
    default_num_heads,
    resolve_num_heads,
    softmax_attention,
)

C, HEADS, N = 16, 4, 10


def _pair(**kw) -> tuple[GlobalSelfAttention, GlobalSelfAttention]:
    torch.manual_seed(0)
    fused = GlobalSelfAttention(C, HEADS, fused_attn=True, **kw).double()
    plain = GlobalSelfAttention(C, HEADS, fused_attn=False, **kw).double()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def _bool_mask(n: int = N) -> torch.Tensor:
    mask = torch.rand(n, n, generator=torch.Generator().manual_seed(1)) > 0.5
    return mask | torch.eye(n, dtype=torch.bool)  # every query keeps at least itself


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "per_head"])
def test_fused_and_plain_paths_agree(qk_norm: bool, mask_kind: str | None) -> None:
    fused, plain = _pair(qk_norm=qk_norm)
    x = torch.randn(2, N, C, dtype=torch.float64)
    mask = {
        None: None,
        "bool": _bool_mask(),
        "float": torch.randn(N, N, dtype=torch.float64),
        "per_head": torch.randn(2, HEADS, N, N, dtype=torch.float64),
    }[mask_kind]
    torch.testing.assert_close(fused(x, mask), plain(x, mask))


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_matches_torch_multihead_attention(fused_attn: bool, masked: bool) -> None:
    torch.manual_seed(0)
    ours = GlobalSelfAttention(C, HEADS, fused_attn=fused_attn).double().eval()
    ref = nn.MultiheadAttention(C, HEADS, batch_first=True).double().eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.proj.weight)
        ref.out_proj.bias.copy_(ours.proj.bias)
    x = torch.randn(3, N, C, dtype=torch.float64)
    mask = _bool_mask() if masked else None
    expected, _ = ref(x, x, x, attn_mask=None if mask is None else ~mask, need_weights=False)
    torch.testing.assert_close(ours(x, mask), expected)


def test_attention_mixes_tokens_not_heads() -> None:
    """The article's sketch attended over heads; here each token's output depends on others."""
    attn = GlobalSelfAttention(C, HEADS).eval()
    x = torch.randn(1, N, C, requires_grad=True)
    attn(x)[0, 0].sum().backward()
    assert (x.grad[0, 1:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("fused_attn", [True, False])
def test_masked_key_has_no_influence(fused_attn: bool) -> None:
    torch.manual_seed(0)
    attn = GlobalSelfAttention(C, HEADS, fused_attn=fused_attn).eval()
    j = 3
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[:, j] = False
    mask[j, j] = True  # token j may still see itself
    x = torch.randn(2, N, C, requires_grad=True)
    y = attn(x, mask)
    others = [i for i in range(N) if i != j]
    y[:, others].sum().backward()
    assert x.grad[:, j].abs().max() == 0
    assert (x.grad[:, others].abs().sum(-1) > 0).all()

    x2 = x.detach().clone()
    x2[:, j] += 10.0
    with torch.no_grad():
        y2 = attn(x2, mask)
    torch.testing.assert_close(y2[:, others], y.detach()[:, others])
    assert not torch.allclose(y2[:, j], y.detach()[:, j])


def test_plain_path_exposes_weights_through_attn_drop() -> None:
    attn = GlobalSelfAttention(C, HEADS, fused_attn=False).eval()
    seen = []
    attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    attn(torch.randn(2, N, C))
    (weights,) = seen
    assert weights.shape == (2, HEADS, N, N)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, N))


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_reference_math_matches_torch_sdpa(mask_kind: str) -> None:
    q, k, v = torch.randn(3, 2, N, 8, dtype=torch.float64).unbind(0)
    mask = _bool_mask() if mask_kind == "bool" else torch.randn(N, N, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(softmax_attention(q, k, v, mask), expected)


@pytest.mark.parametrize("dim", [1, 3, 12, 32, 48, 64, 96, 100, 768])
def test_default_num_heads_divides_any_channel_count(dim: int) -> None:
    heads = default_num_heads(dim)
    assert 1 <= heads <= 8 and dim % heads == 0
    assert heads == 1 or dim // heads >= 8
    bigger = [h for h in range(heads + 1, 9) if dim % h == 0 and dim // h >= 8]
    assert not bigger


def test_bad_num_heads_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="divide dim"):
        resolve_num_heads(30, 8)
    with pytest.raises(ValueError, match="divide dim"):
        GlobalSelfAttention(30, num_heads=4)


def test_registry_block_works_for_awkward_channels() -> None:
    block = create("global_attn", 12, ls_init_value=1.0).eval()
    x = torch.randn(1, 12, 5, 7)
    y = block(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
