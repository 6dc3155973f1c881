"""Conv -> norm -> activation, the unit shared by the convolutional global-context blocks.

Used by the dilated (Wang et al. 2018, HDC), pyramid-pooling (Zhao et al. 2017, PSPNet),
ASPP (Chen et al. 2017, DeepLabV3) and large-kernel (Ding et al. 2022, RepLKNet) blocks.
Unlike ``timm.layers.ConvNormAct`` it allows an activation without a norm (``norm_layer=None``),
which the batch-size-1 pooling branches need.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 1,
    dilation: int = 1,
    groups: int = 1,
    norm_layer: NormFactory | None = nn.BatchNorm2d,
    act_layer: ActFactory | None = nn.ReLU,
) -> nn.Sequential:
    """A ``kernel_size`` conv with "same" padding, then an optional norm and activation.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Odd square kernel size.
        dilation: Dilation rate; padding is ``dilation * (kernel_size // 2)``.
        groups: Convolution groups.
        norm_layer: Norm factory taking the channel count; ``None`` gives the conv a bias
            instead.
        act_layer: Activation factory; ``None`` for no activation.

    Returns:
        ``nn.Sequential(conv[, norm][, act])`` mapping ``in_channels`` to ``out_channels``
        at the same spatial size.
    """
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd for 'same' padding, got {kernel_size}")
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=groups,
            bias=norm_layer is None,
        )
    ]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    if act_layer is not None:
        layers.append(act_layer())
    return nn.Sequential(*layers)
