"""Feature pyramid network with optional global-context blocks from the registry.

Paper: Lin, Dollar, Girshick, He, Hariharan, Belongie 2017, "Feature Pyramid Networks for
Object Detection" (CVPR), https://arxiv.org/abs/1612.03144. Each backbone map ``C_l`` is
projected by a 1x1 lateral conv; from the top down, each merged map is upsampled (nearest) and
added to the next finer lateral; a 3x3 conv smooths every merged map into the output ``P_l``.

Global context (the source article's small-object recipe, "PPM + large-kernel convolution +
a P2 level"): registry blocks (:func:`gattn.modules.create`: ``ppm``, ``large_kernel``,
``global_tokens``, ``nonlocal``, ...) run on the merged map before its 3x3 conv, in the order
given, either on the top level only (``global_at="top"``, as PSPNet's module sits on top of
UPerNet's FPN, Xiao et al. 2018) or on every level (``"all"``, each level its own blocks).
On the top level the blocks run *before* the top-down path, so the context they gather
reaches every finer level, P2 included, at the cost of one block on the smallest map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from gattn.modules._registry import available, create

GlobalAt = Literal["top", "all"]
ModuleSpec = str | Mapping[str, Any]


def create_global_modules(specs: Sequence[ModuleSpec], channels: int) -> nn.Sequential:
    """Registry blocks for a ``(B, channels, H, W)`` map, run in order.

    Args:
        specs: Block names (``"ppm"``) or dicts ``{"block": "ppm", **options}``.
        channels: Channel count of the map.

    Raises:
        ValueError: an unknown block or a malformed entry (the message names the
            ``global_modules`` key and lists the valid blocks).
    """
    blocks = []
    for spec in specs:
        options = dict(spec) if isinstance(spec, Mapping) else {"block": spec}
        name = options.pop("block", None)
        if name not in available():
            raise ValueError(
                f"unknown block {name!r} in global_modules (entry {spec!r}); valid blocks: "
                f"{', '.join(available())}, each a name or {{'block': name, **options}}"
            )
        blocks.append(create(name, channels, **options))
    return nn.Sequential(*blocks)


class FeaturePyramid(nn.Module):
    """FPN outputs ``P_l`` of backbone maps ``C_l``, finest first, with global-context blocks.

    Args:
        in_channels: Channels of the backbone maps, finest first (each half the previous
            one's resolution).
        channels: Channels of every output level.
        global_modules: Registry blocks, names or ``{"block": name, **options}`` dicts;
            empty for a plain FPN.
        global_at: ``"top"`` (the coarsest level, before the top-down path) or ``"all"``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        *,
        global_modules: Sequence[ModuleSpec] = (),
        global_at: GlobalAt = "top",
    ) -> None:
        super().__init__()
        if global_at not in ("top", "all"):
            raise ValueError(f"global_at must be 'top' or 'all', got {global_at!r}")
        if not in_channels:
            raise ValueError("FeaturePyramid needs at least one input level")
        self.channels = channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels
        )
        num = len(in_channels)
        self.context = nn.ModuleList(
            create_global_modules(
                global_modules if global_at == "all" or i == num - 1 else (), channels
            )
            for i in range(num)
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Detectron's c2_xavier_fill for the FPN convs (uniform, gain 1, zero bias).
        for conv in [*self.lateral, *self.output]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[P_min, ..., P_top]`` ``(B, channels, h_l, w_l)`` of maps ``[C_min, ..., C_top]``."""
        merged = self.context[-1](self.lateral[-1](features[-1]))
        outputs = [self.output[-1](merged)]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.lateral[i](features[i])
            top_down = F.interpolate(merged, size=lateral.shape[-2:], mode="nearest")
            merged = self.context[i](lateral + top_down)
            outputs.insert(0, self.output[i](merged))
        return outputs
