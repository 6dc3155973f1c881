"""Residual adapter that turns a token mixer into a drop-in ``(B, C, H, W)`` block.

Pre-norm transformer layout (Vaswani et al. 2017; Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words"): ``x + gamma * mixer(norm(x))``. ``gamma`` is a LayerScale (Touvron et al. 2021,
"Going deeper with Image Transformers") so a block inserted into a trained backbone can start
close to the identity.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class LayerScale(nn.Module):
    """Per-channel learnable scale on the last dimension.

    Args:
        dim: Channel count.
        init_value: Initial value of every scale; ``0`` makes the residual branch start silent.
    """

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.init_value = init_value
        self.gamma = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class TokenMixerBlock(nn.Module):
    """``x + gamma * mixer(norm(x))`` on an NCHW map, with the mixer run on tokens.

    Args:
        channels: Channel count ``C``.
        mixer: Token mixer. With ``layout="nhwc"`` it maps ``(B, H, W, C)`` to the same shape
            (window / global-token attention); with ``layout="tokens"`` it maps ``(B, N, C)``
            to the same shape (global self-attention over ``N = H * W``).
        layout: Which token layout ``mixer`` expects.
        norm_layer: Normalisation over channels applied before the mixer.
        ls_init_value: LayerScale initial value; ``None`` disables LayerScale.
    """

    def __init__(
        self,
        channels: int,
        mixer: nn.Module,
        layout: Literal["nhwc", "tokens"] = "nhwc",
        norm_layer: type[nn.Module] = nn.LayerNorm,
        ls_init_value: float | None = 1e-5,
    ) -> None:
        super().__init__()
        if layout not in ("nhwc", "tokens"):
            raise ValueError(f"layout must be 'nhwc' or 'tokens', got {layout!r}")
        self.layout = layout
        self.norm = norm_layer(channels)
        self.mixer = mixer
        self.ls = (
            LayerScale(channels, ls_init_value) if ls_init_value is not None else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        t = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.norm(t)
        if self.layout == "tokens":
            y = self.mixer(y.reshape(B, H * W, C)).reshape(B, H, W, C)
        else:
            y = self.mixer(y)
        return x + self.ls(y).permute(0, 3, 1, 2)
