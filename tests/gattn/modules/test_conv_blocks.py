"""Pooling blocks (PPM, ASPP) at batch size 1, and SE / CBAM against plain math."""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gattn.modules._registry import available, create
from gattn.modules.aspp import ASPP
from gattn.modules.cbam import CBAM
from gattn.modules.pyramid_pooling import PoolingBranch, PyramidPoolingModule
from gattn.modules.squeeze_excite import SEBlock, make_rd_channels

CONV_BLOCKS = {
    "nonlocal": "non_local",
    "large_kernel": "large_kernel",
    "dilated": "dilated",
    "ppm": "pyramid_pooling",
    "aspp": "aspp",
    "se": "squeeze_excite",
    "cbam": "cbam",
}


def test_conv_blocks_register_on_import() -> None:
    for module in CONV_BLOCKS.values():
        importlib.import_module(f"gattn.modules.{module}")
    assert set(CONV_BLOCKS) <= set(available())


def _train_step(block: nn.Module, x: torch.Tensor) -> None:
    block.train()
    x = x.clone().requires_grad_(True)
    y = block(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().mean().backward()
    missing = [n for n, p in block.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", ["ppm", "aspp"])
@pytest.mark.parametrize("size", [(37, 53), (6, 6)])
def test_pooling_blocks_train_at_batch_one(name: str, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    _train_step(create(name, 16), torch.randn(1, 16, *size))


@pytest.mark.parametrize("cls", [PyramidPoolingModule, ASPP])
def test_pooling_blocks_train_at_batch_one_with_group_norm(cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    block = cls(16, pool_norm_layer=partial(nn.GroupNorm, 1))
    _train_step(block, torch.randn(1, 16, 37, 53))


def test_ppm_branches_normalise_the_pooled_context_per_sample() -> None:
    """The default PPM branch output before its ReLU has zero mean and unit variance over
    channels for each sample, whatever the scale of the pooled signal."""
    torch.manual_seed(0)
    block = PyramidPoolingModule(16, pool_sizes=(1,)).train()
    conv, norm = block.branches[0].conv[0], block.branches[0].conv[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 1
    x = (
        torch.randn(3, 16, 1, 1).expand(3, 16, 9, 9)
        * torch.tensor([0.1, 1.0, 10.0])[:, None, None, None]
    )
    pre = norm(conv(block.branches[0].pool(x))).flatten(1)
    torch.testing.assert_close(pre.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(pre.var(1, unbiased=False), torch.ones(3), atol=1e-2, rtol=0)


def test_batchnorm_on_the_image_level_branch_would_fail_at_batch_one() -> None:
    """Why the pooled branches default to no norm: BN cannot train on one value per channel."""
    branch = PoolingBranch(8, 4, 1, norm_layer=nn.BatchNorm2d).train()
    with pytest.raises(ValueError, match="more than 1 value"):
        branch(torch.randn(1, 8, 9, 9))


def test_image_level_branch_is_the_broadcast_global_mean() -> None:
    torch.manual_seed(0)
    branch = PoolingBranch(5, 3, 1)
    x = torch.randn(2, 5, 7, 9)
    conv = branch.conv[0]
    pooled = x.mean(dim=(2, 3))
    expected = torch.relu(pooled @ conv.weight[:, :, 0, 0].T + conv.bias)
    torch.testing.assert_close(branch(x), expected[:, :, None, None].expand(2, 3, 7, 9))


@pytest.mark.parametrize("name", ["ppm", "aspp"])
def test_pooling_blocks_have_global_reach(name: str) -> None:
    torch.manual_seed(0)
    block = create(name, 8).eval()
    x = torch.randn(1, 8, 40, 40, requires_grad=True)
    block(x)[0, :, 0, 0].sum().backward()
    # Beyond every conv's reach (ASPP's largest rate is 18); only the pooling sees it.
    assert x.grad[0, :, -1, -1].abs().sum() > 0


def test_aspp_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    block = ASPP(8, rates=(1, 2), drop_rate=0.5)
    x = torch.randn(2, 8, 6, 6)
    block.train()
    assert not torch.equal(block(x), block(x))
    block.eval()
    torch.testing.assert_close(block(x), block(x))


def test_rd_channels_never_zero_nor_wider_than_input() -> None:
    for channels in range(1, 300):
        rd = make_rd_channels(channels)
        assert 1 <= rd <= channels
        assert rd % 8 == 0 or rd == channels
    assert make_rd_channels(512) == 512 // 16
    assert SEBlock(4).fc1.out_channels == CBAM(4).channel.fc1.out_channels == 4


def _mlp(block: SEBlock, s: torch.Tensor) -> torch.Tensor:
    """The bottleneck MLP on (B, C) descriptors, written with matrix products."""
    w1, b1 = block.fc1.weight[:, :, 0, 0], block.fc1.bias
    w2, b2 = block.fc2.weight[:, :, 0, 0], block.fc2.bias
    return torch.clamp(s @ w1.T + b1, min=0) @ w2.T + b2


@pytest.mark.parametrize("channels", [3, 32])
def test_se_matches_plain_math(channels: int) -> None:
    torch.manual_seed(0)
    block = create("se", channels)
    x = torch.randn(2, channels, 5, 7)
    gate = 1 / (1 + torch.exp(-_mlp(block, x.mean(dim=(2, 3)))))
    torch.testing.assert_close(block(x), x * gate[:, :, None, None])


def _spatial_conv(weight: torch.Tensor, bias: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) -> (B, H, W) cross-correlation with zero padding, as explicit shifted sums."""
    k = weight.shape[-1]
    p = k // 2
    H, W = maps.shape[-2:]
    padded = F.pad(maps, (p, p, p, p))
    out = bias.expand(maps.shape[0], H, W).clone()
    for c in range(2):
        for i in range(k):
            for j in range(k):
                out = out + weight[0, c, i, j] * padded[:, c, i : i + H, j : j + W]
    return out


@pytest.mark.parametrize("kernel_size", [7, 3])
def test_cbam_matches_plain_math(kernel_size: int) -> None:
    torch.manual_seed(0)
    block = create("cbam", 16, spatial_kernel_size=kernel_size)
    x = torch.randn(2, 16, 6, 9)
    ca = block.channel
    logits = _mlp(ca, x.mean(dim=(2, 3))) + _mlp(ca, x.amax(dim=(2, 3)))
    x1 = x * torch.sigmoid(logits)[:, :, None, None]
    maps = torch.stack([x1.mean(1), x1.amax(1)], dim=1)
    sa = _spatial_conv(block.spatial.conv.weight, block.spatial.conv.bias, maps)
    expected = x1 * torch.sigmoid(sa)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)
