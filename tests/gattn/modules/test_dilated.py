"""Hybrid dilated convolution: the HDC check and the hole-free receptive field."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gattn.modules._registry import create
from gattn.modules.dilated import (
    DilatedConvBlock,
    hdc_max_distance,
    hdc_violation,
    satisfies_hdc,
)


def _covered_offsets(rates: tuple[int, ...]) -> set[int]:
    """1-D offsets a stack of 3-tap dilated convs samples: the sum set of {-r, 0, r}."""
    offsets = {0}
    for r in rates:
        offsets = {o + t for o in offsets for t in (-r, 0, r)}
    return offsets


def _hole_free(rates: tuple[int, ...]) -> bool:
    span = sum(rates)
    return set(range(-span, span + 1)) <= _covered_offsets(rates)


def test_paper_examples() -> None:
    # Wang et al. 2018, Sec. 3.2: K = 3, [1, 2, 5] gives M_2 = 2; [1, 2, 9] gives M_2 = 5.
    assert hdc_max_distance((1, 2, 5)) == 2
    assert hdc_max_distance((1, 2, 9)) == 5
    assert satisfies_hdc((1, 2, 5))
    assert not satisfies_hdc((1, 2, 9))


@pytest.mark.parametrize("rates", [(2, 4, 8), (2, 2, 2), (3, 6)])
def test_rejects_gridding_rates(rates: tuple[int, ...]) -> None:
    assert "gridding" in hdc_violation(rates)
    with pytest.raises(ValueError, match="gridding"):
        DilatedConvBlock(4, rates=rates)
    with pytest.raises(ValueError, match="gridding"):
        create("dilated", 4, rates=rates)


def test_rejects_invalid_rates() -> None:
    for rates in [(), (0, 1), (1, 2.5)]:
        with pytest.raises(ValueError, match="positive integers"):
            DilatedConvBlock(4, rates=rates, allow_gridding=True)


def test_check_agrees_with_exact_coverage() -> None:
    """The HDC check accepts exactly the rate stacks whose receptive field has no hole."""
    for n in (1, 2, 3):
        for rates in itertools.product(range(1, 7), repeat=n):
            assert satisfies_hdc(rates) == _hole_free(rates), rates


def _receptive_mask(rates: tuple[int, ...], allow_gridding: bool = False) -> torch.Tensor:
    """Input pixels the centre output depends on, for a linear stack with positive weights."""
    torch.manual_seed(0)
    block = DilatedConvBlock(
        2, rates=rates, norm_layer=None, act_layer=None, allow_gridding=allow_gridding
    )
    with torch.no_grad():
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.uniform_(0.1, 1.0)  # positive: no accidental cancellation
                conv.bias.zero_()
    size = 2 * sum(rates) + 7
    x = torch.randn(1, 2, size, size, requires_grad=True)
    c = size // 2
    block(x)[0, :, c, c].sum().backward()
    return x.grad[0].abs().sum(0) > 0


@pytest.mark.parametrize(
    "rates,allow_gridding", [((1, 2, 5), False), ((1, 2, 3), False), ((2, 4, 8), True)]
)
def test_receptive_field_holes(rates: tuple[int, ...], allow_gridding: bool) -> None:
    mask = _receptive_mask(rates, allow_gridding)
    span, c = sum(rates), mask.shape[0] // 2
    axis = torch.zeros(mask.shape[0], dtype=torch.bool)
    axis[[c + o for o in _covered_offsets(rates)]] = True
    assert torch.equal(mask, axis[:, None] & axis[None, :])
    inside = mask[c - span : c + span + 1, c - span : c + span + 1]
    assert bool(inside.all()) == satisfies_hdc(rates)
    assert not mask[: c - span].any() and not mask[c + span + 1 :].any()


def test_residual_block_maps_c_to_c_with_default_rates() -> None:
    block = create("dilated", 6)
    assert isinstance(block, DilatedConvBlock) and block.rates == (1, 2, 5)
    assert [m.dilation for m in block.modules() if isinstance(m, nn.Conv2d)] == [
        (1, 1),
        (2, 2),
        (5, 5),
    ]
    x = torch.randn(1, 6, 37, 53)
    assert block.train()(x).shape == x.shape
