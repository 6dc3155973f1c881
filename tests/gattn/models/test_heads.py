"""Decode heads: shapes on odd sizes, batch-1 training, global reach, context fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gattn.models import HEADS, DecodeHead, FCNHead

C_IN, CH, K = 12, 8, 3


def _head(name: str, **kwargs) -> DecodeHead:
    torch.manual_seed(0)
    if name == "deeplabv3":
        kwargs.setdefault("rates", (1, 2))
    return HEADS[name](C_IN, CH, K, **kwargs)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("size", [(7, 9), (5, 3)])
def test_head_shape_and_one_training_step_at_batch_1(name: str, size: tuple[int, int]) -> None:
    head = _head(name).train()
    x = torch.randn(1, C_IN, *size)
    target = torch.randint(0, K, (1, *size))
    logits = head(x)
    assert logits.shape == (1, K, *size)
    classifier = head.conv_seg.weight.detach().clone()
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(logits, target)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in head.parameters())
    assert not torch.equal(head.conv_seg.weight, classifier)


def _reach(head: DecodeHead, size: int = 15) -> bool:
    """Does a change at the top-left input corner move the bottom-right logits?"""
    head.eval()
    x = torch.randn(1, C_IN, size, size)
    y = x.clone()
    y[:, :, 0, 0] += 10.0
    with torch.no_grad():
        return not torch.allclose(head(x)[..., -1, -1], head(y)[..., -1, -1])


@pytest.mark.parametrize("name", ["psp", "deeplabv3", "nonlocal"])
def test_global_heads_see_the_whole_map(name: str) -> None:
    head = _head(name)
    if name == "nonlocal":
        nn.init.ones_(head.non_local.norm.weight)  # leave the identity initialisation
    assert _reach(head)


def test_fcn_head_is_local() -> None:
    assert not _reach(_head("fcn"))  # conv, conv, conv(cat): 3 cells, not 14
    # n stacked 3x3 convs reach exactly n cells: the corner of a 5x5 map is 4 away.
    assert not _reach(_head("fcn", num_convs=3, concat_input=False), size=5)
    assert _reach(_head("fcn", num_convs=4, concat_input=False), size=5)


@pytest.mark.parametrize("name", HEADS)
def test_global_context_is_added_through_a_zero_started_projection(name: str) -> None:
    head = _head(name, context_channels=6).eval()
    x, ctx = torch.randn(2, C_IN, 5, 7), torch.randn(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(head(x, ctx), head(x))  # silent at initialisation
        nn.init.normal_(head.context_proj.weight)
        nn.init.normal_(head.context_proj.bias)
        feat = head.forward_features(x)
        bias = ctx @ head.context_proj.weight.T + head.context_proj.bias
        expected = head.conv_seg(feat + bias[:, :, None, None])
        torch.testing.assert_close(head(x, ctx), expected)
        assert not torch.allclose(head(x, ctx), head(x))


def test_context_errors() -> None:
    x = torch.randn(1, C_IN, 4, 4)
    with pytest.raises(ValueError, match="without context_channels"):
        FCNHead(C_IN, CH, K)(x, torch.randn(1, 6))
    with pytest.raises(ValueError, match=r"global_context must be \(B, 6\)"):
        FCNHead(C_IN, CH, K, context_channels=6)(x, torch.randn(1, 5))


def test_heads_share_the_base_classifier() -> None:
    for name in HEADS:
        head = _head(name, dropout_ratio=0.0)
        assert isinstance(head, DecodeHead)
        assert (head.conv_seg.in_channels, head.conv_seg.out_channels) == (CH, K)
        feat = torch.randn(1, CH, 3, 3)
        torch.testing.assert_close(head.cls_seg(feat), head.conv_seg(feat))
