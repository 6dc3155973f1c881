"""LargeKernelConv: exact structural re-parameterisation, reach of the large kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gattn.modules._registry import create
from gattn.modules.large_kernel import LargeKernelBlock, LargeKernelConv


def _randomise_bn(module: nn.Module) -> None:
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("kernel_size,small_kernel", [(13, 5), (13, 3), (31, 5), (7, None)])
@pytest.mark.parametrize("size", [(37, 53), (5, 5)])
def test_reparameterisation_is_exact(
    kernel_size: int, small_kernel: int | None, size: tuple[int, int]
) -> None:
    torch.manual_seed(0)
    conv = LargeKernelConv(4, kernel_size, small_kernel)
    _randomise_bn(conv)
    conv.eval()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        before = conv(x)
        conv.reparameterize()
        after = conv(x)
    convs = [m for m in conv.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].bias is not None
    assert convs[0].kernel_size == (kernel_size, kernel_size)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in conv.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_block_reparameterisation_is_exact_through_the_registry() -> None:
    torch.manual_seed(0)
    block = create("large_kernel", 8)
    assert isinstance(block, LargeKernelBlock)
    _randomise_bn(block)
    block.eval()
    x = torch.randn(1, 8, 9, 6)
    with torch.no_grad():
        before = block(x)
        block.reparameterize()
        block.reparameterize()  # idempotent
        after = block(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_fused_conv_matches_plain_sum_of_branches() -> None:
    """Independent check of the fold: eval BN written out, kernels summed by hand."""
    torch.manual_seed(3)
    conv = LargeKernelConv(3, 9, 3)
    _randomise_bn(conv)
    conv.eval()
    expected_w = torch.zeros(3, 1, 9, 9)
    expected_b = torch.zeros(3)
    for branch, k in ((conv.large, 9), (conv.small, 3)):
        w, bn = branch[0].weight.detach(), branch[1]
        s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        off = (9 - k) // 2
        expected_w[:, :, off : off + k, off : off + k] += w * s[:, None, None, None]
        expected_b += bn.bias.detach() - bn.running_mean * s
    conv.reparameterize()
    torch.testing.assert_close(conv.fused.weight.detach(), expected_w)
    torch.testing.assert_close(conv.fused.bias.detach(), expected_b)


def test_large_kernel_reaches_across_a_small_map() -> None:
    torch.manual_seed(0)
    conv = LargeKernelConv(2, 31, 5).eval()
    x = torch.randn(1, 2, 13, 13, requires_grad=True)
    conv(x)[0, :, 0, 0].sum().backward()
    # 12 pixels away in both axes: inside the 31x31 kernel, far outside the 5x5 one.
    assert x.grad[0, :, 12, 12].abs().sum() > 0


def test_rejects_even_or_too_large_small_kernel() -> None:
    with pytest.raises(ValueError, match="odd"):
        LargeKernelConv(4, 30)
    with pytest.raises(ValueError, match="small_kernel"):
        LargeKernelConv(4, 7, 9)
