"""Depthwise large-kernel convolution with structural re-parameterisation.

Paper: Ding, Zhang, Han, Ding 2022, "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel
Design in CNNs" (RepLKNet, CVPR), https://arxiv.org/abs/2203.06717.

Training: a depthwise ``K x K`` conv + BN in parallel with a depthwise ``k x k`` conv + BN
(``k < K``), summed; the small kernel eases optimisation of the large one. Inference:
:meth:`LargeKernelConv.reparameterize` folds each BN into its conv and adds the zero-padded
small kernel to the large one, leaving a single ``K x K`` depthwise conv with bias that gives
the same output (eval-mode BN is affine, and convolution is linear in its kernel).

``LargeKernelBlock`` is the drop-in ``C -> C`` block registered as ``"large_kernel"``: the
RepLKNet block ``x + PW2(ReLU(LK(PW1(BN(x)))))`` with 1x1 convs ``PW1`` (conv-BN-ReLU) and
``PW2`` (conv-BN). A kernel larger than the feature map works: "same" padding makes the conv
see the whole (zero-padded) map.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._conv import ActFactory, NormFactory, conv_norm_act
from ._registry import register_block


def fuse_conv_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a bias-free conv into the conv.

    ``bn(conv(x, w)) = conv(x, w * s) + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``.

    Args:
        weight: Conv kernel ``(C_out, C_in / groups, k, k)``.
        bn: The BatchNorm over ``C_out`` channels (running statistics are used).

    Returns:
        ``(weight, bias)`` of the equivalent conv.
    """
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("fuse_conv_bn needs a BatchNorm with running statistics")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return weight * scale.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def _fuse_branch(branch: nn.Sequential) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fuse_conv_bn` of a ``conv_norm_act`` branch: ``(conv, BatchNorm2d)``."""
    conv, bn = branch[0], branch[1]
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        raise TypeError(f"expected a (Conv2d, BatchNorm2d) branch, got {branch}")
    return fuse_conv_bn(conv.weight, bn)


class LargeKernelConv(nn.Module):
    """Depthwise ``K x K`` conv+BN plus depthwise ``k x k`` conv+BN, re-parameterisable.

    Args:
        channels: Channel count ``C`` (input and output; the convs are depthwise).
        kernel_size: Odd large kernel size ``K``.
        small_kernel: Odd small kernel size ``k <= K`` of the parallel branch; ``None`` for
            no small branch.
    """

    def __init__(self, channels: int, kernel_size: int = 31, small_kernel: int | None = 5) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if small_kernel is not None and (small_kernel % 2 != 1 or small_kernel > kernel_size):
            raise ValueError(
                f"small_kernel must be odd and <= kernel_size={kernel_size}, got {small_kernel}"
            )
        self.channels = channels
        self.kernel_size = kernel_size
        self.large = conv_norm_act(channels, channels, kernel_size, groups=channels, act_layer=None)
        self.small = (
            conv_norm_act(channels, channels, small_kernel, groups=channels, act_layer=None)
            if small_kernel is not None
            else None
        )
        self.fused: nn.Conv2d | None = None

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Replace both branches by one biased ``K x K`` depthwise conv (call in eval mode).

        The fold uses the BatchNorms' running statistics, so outputs match eval-mode outputs
        before the call. Calling it again does nothing.
        """
        if self.fused is not None:
            return
        weight, bias = _fuse_branch(self.large)
        if self.small is not None:
            small_w, small_b = _fuse_branch(self.small)
            pad = (self.kernel_size - small_w.shape[-1]) // 2
            weight = weight + F.pad(small_w, [pad] * 4)
            bias = bias + small_b
        fused = nn.Conv2d(
            self.channels,
            self.channels,
            self.kernel_size,
            padding=self.kernel_size // 2,
            groups=self.channels,
            bias=True,
        ).to(weight)
        assert fused.bias is not None  # bias=True
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        del self.large
        self.small = None
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        out = self.large(x)
        if self.small is not None:
            out = out + self.small(x)
        return out


@register_block("large_kernel")
class LargeKernelBlock(nn.Module):
    """RepLKNet block ``x + PW2(act(LK(PW1(norm(x)))))``, mapping ``C -> C``.

    Args:
        channels: Channel count ``C``.
        kernel_size: Odd large kernel size of the depthwise conv.
        small_kernel: Odd small kernel size of the parallel re-parameterisable branch, or
            ``None``.
        norm_layer: Norm of the pre-norm and of the pointwise convs; ``None`` for none.
        act_layer: Activation after ``PW1`` and after the large-kernel conv.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 31,
        small_kernel: int | None = 5,
        norm_layer: NormFactory | None = nn.BatchNorm2d,
        act_layer: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        self.pre_norm = norm_layer(channels) if norm_layer is not None else nn.Identity()
        self.pw1 = conv_norm_act(channels, channels, 1, norm_layer=norm_layer, act_layer=act_layer)
        self.lk = LargeKernelConv(channels, kernel_size, small_kernel)
        self.act = act_layer()
        self.pw2 = conv_norm_act(channels, channels, 1, norm_layer=norm_layer, act_layer=None)

    def reparameterize(self) -> None:
        """Fuse the large-kernel conv's branches (see :meth:`LargeKernelConv.reparameterize`)."""
        self.lk.reparameterize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.lk(self.pw1(self.pre_norm(x)))))
