"""NonLocalBlock: identity at init, plain-math parity, sub-sampling and global reach."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gattn.modules.non_local import NonLocalBlock

MODES = ["embedded_gaussian", "dot_product"]


def _randomise_output(block: NonLocalBlock) -> None:
    """Give the zero-initialised output map random weights (and BN random statistics)."""
    with torch.no_grad():
        nn.init.normal_(block.proj.weight, std=0.5)
        if block.proj.bias is not None:
            nn.init.normal_(block.proj.bias)
        if isinstance(block.norm, nn.BatchNorm2d):
            block.norm.weight.normal_()
            block.norm.bias.normal_()
            block.norm.running_mean.normal_()
            block.norm.running_var.uniform_(0.5, 2.0)


def _reference_pool(t: torch.Tensor, s: int) -> torch.Tensor:
    """Max-pool by ``s`` with partial windows kept at the border, via -inf padding + reshape."""
    if s == 1:
        return t
    B, C, H, W = t.shape
    Hp, Wp = math.ceil(H / s) * s, math.ceil(W / s) * s
    t = F.pad(t, (0, Wp - W, 0, Hp - H), value=float("-inf"))
    return t.reshape(B, C, Hp // s, s, Wp // s, s).amax(dim=(3, 5))


def _reference(block: NonLocalBlock, x: torch.Tensor, sub_sample: int) -> torch.Tensor:
    """Wang et al. 2018, Eq. 1-3 written out with explicit (HW) x (HW/s^2) matrices."""
    B, C, H, W = x.shape

    def conv1x1(conv: nn.Conv2d, t: torch.Tensor) -> torch.Tensor:
        w = conv.weight[:, :, 0, 0]
        out = torch.einsum("oc,bchw->bohw", w, t)
        return out + conv.bias[None, :, None, None] if conv.bias is not None else out

    theta = conv1x1(block.theta, x).flatten(2)  # (B, d, N)
    phi = _reference_pool(conv1x1(block.phi, x), sub_sample).flatten(2)  # (B, d, M)
    g = _reference_pool(conv1x1(block.g, x), sub_sample).flatten(2)  # (B, d, M)
    logits = torch.einsum("bdn,bdm->bnm", theta, phi)
    if block.mode == "embedded_gaussian":
        f = torch.exp(logits - logits.amax(-1, keepdim=True))
        f = f / f.sum(-1, keepdim=True)
    else:
        f = logits / phi.shape[-1]
    y = torch.einsum("bnm,bdm->bdn", f, g).reshape(B, -1, H, W)
    z = conv1x1(block.proj, y)
    if isinstance(block.norm, nn.BatchNorm2d):
        bn = block.norm
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        z = (z - bn.running_mean[:, None, None]) * scale[:, None, None] + bn.bias[:, None, None]
    return x + z


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [1, 2])
@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, None])
def test_identity_at_init(mode: str, sub_sample: int, norm_layer: type[nn.Module] | None) -> None:
    torch.manual_seed(0)
    block = NonLocalBlock(8, mode=mode, sub_sample=sub_sample, norm_layer=norm_layer)
    x = torch.randn(2, 8, 7, 9)
    assert torch.equal(block.train()(x), x)
    assert torch.equal(block.eval()(x), x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, None])
def test_leaves_identity_after_one_step(mode: str, norm_layer: type[nn.Module] | None) -> None:
    torch.manual_seed(0)
    block = NonLocalBlock(8, mode=mode, sub_sample=2, norm_layer=norm_layer).train()
    x, target = torch.randn(2, 8, 7, 9), torch.randn(2, 8, 7, 9)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    F.mse_loss(block(x), target).backward()
    opt.step()
    delta = block(x) - x
    assert delta.abs().amax() > 1e-4
    # Not just a learned constant shift: the residual branch varies over positions.
    assert delta.flatten(2).std(dim=-1).amax() > 1e-4


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, None])
def test_zero_init_off_trains_attention_from_the_first_step(
    norm_layer: type[nn.Module] | None,
) -> None:
    """The zero start gives theta/phi/g no gradient; ``zero_init=False`` gives them one."""
    x, target = torch.randn(2, 8, 7, 9), torch.randn(2, 8, 7, 9)
    grads = {}
    for zero_init in (True, False):
        torch.manual_seed(0)
        block = NonLocalBlock(8, sub_sample=2, norm_layer=norm_layer, zero_init=zero_init)
        out = block.train()(x)
        assert torch.equal(out, x) == zero_init
        F.mse_loss(out, target).backward()
        grads[zero_init] = [block.theta.weight.grad, block.phi.weight.grad, block.g.weight.grad]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads[True])
    assert all(g is not None and g.abs().amax() > 1e-6 for g in grads[False])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [1, 2, 3])
@pytest.mark.parametrize("norm_layer", [nn.BatchNorm2d, None])
def test_matches_plain_math(mode: str, sub_sample: int, norm_layer: type[nn.Module] | None) -> None:
    torch.manual_seed(1)
    block = NonLocalBlock(
        6, inter_channels=4, mode=mode, sub_sample=sub_sample, norm_layer=norm_layer
    ).double()
    _randomise_output(block)
    block.eval()
    x = torch.randn(2, 6, 7, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), _reference(block, x, sub_sample))


@pytest.mark.parametrize("mode", MODES)
def test_sub_sampling_reduces_keys(mode: str) -> None:
    x = torch.randn(1, 8, 7, 9)
    for s, keys in [(1, 7 * 9), (2, 4 * 5), (3, 3 * 3)]:
        f = NonLocalBlock(8, mode=mode, sub_sample=s).affinity(x)
        assert f.shape == (1, 7 * 9, keys)
        if mode == "embedded_gaussian":
            torch.testing.assert_close(f.sum(-1), torch.ones(1, 7 * 9))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sub_sample", [1, 2])
def test_global_reach(mode: str, sub_sample: int) -> None:
    torch.manual_seed(2)
    block = NonLocalBlock(4, mode=mode, sub_sample=sub_sample, norm_layer=None)
    _randomise_output(block)
    x = torch.randn(1, 4, 12, 15, requires_grad=True)
    block(x)[0, :, 0, 0].sum().backward()
    assert x.grad[0, :, -1, -1].abs().sum() > 0


def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="mode"):
        NonLocalBlock(8, mode="gaussian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sub_sample"):
        NonLocalBlock(8, sub_sample=0)
