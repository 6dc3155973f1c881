"""Where a timm model's stages are, what they output, and a wrapper that runs blocks after one.

Global-context blocks (non-local, Wang et al. 2018, "Non-local Neural Networks"; PPM, Zhao et
al. 2017, "Pyramid Scene Parsing Network"; ...) are usually inserted *after a stage* of a
backbone. timm models differ in how a stage is named and in the layout of its output:

=============  ======================  ===================  ==============================
family         stage ``k`` (1-based)   output layout        ``features_only`` module name
=============  ======================  ===================  ==============================
ResNet family  ``layer{k}``            ``(B, C, H, W)``     ``layer{k}``
ConvNeXt       ``stages[k - 1]``       ``(B, C, H, W)``     ``stages_{k - 1}``
Swin           ``layers[k - 1]``       ``(B, H, W, C)``     ``layers_{k - 1}``
ViT            ``blocks[k - 1]``       ``(B, N, C)`` tokens ``model.blocks.{k - 1}``
=============  ======================  ===================  ==============================

Stage ``k`` is the ``k``-th entry of the model's ``feature_info`` whose module is one of
``layerN``, ``stages.N``, ``layers.N`` or ``blocks.N`` (so ResNet's stem entry ``act1`` is not
a stage and ``layer3`` is stage 3). For a ViT every transformer block is a stage: stage ``k``
is the output of the ``k``-th block. The layout comes from timm itself: token models are the
ones with ``patch_embed`` and ``num_prefix_tokens``, and ``output_fmt == "NHWC"`` marks
channels-last stages (Swin).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch
from timm.models._features import FeatureGetterNet, FeatureInfo
from torch import nn

Layout = Literal["nchw", "nhwc", "tokens"]

_STAGE_NAME = re.compile(r"^(layer\d+|stages\.\d+|layers\.\d+|blocks\.\d+)$")


@dataclass(frozen=True)
class StageInfo:
    """One injectable stage of a model.

    Attributes:
        index: 1-based stage number used in injection specs.
        path: Dotted path of the stage module inside the model (``model.get_submodule(path)``).
        channels: Channel count ``C`` of the stage output.
        reduction: Stride of the stage output relative to the input image.
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"`` (``(B, N, C)`` with prefix tokens).
        num_prefix_tokens: Class/register tokens in front of the patch tokens (tokens only).
        grid_size: Patch grid ``(h, w)`` of the patch tokens (tokens only).
    """

    index: int
    path: str
    channels: int
    reduction: int
    layout: Layout
    num_prefix_tokens: int = 0
    grid_size: tuple[int, int] | None = None


def _feature_entries(model: nn.Module) -> list[dict[str, Any]]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, FeatureInfo):
        return info.info  # every entry, not only the selected ``out_indices``
    if isinstance(info, list):
        return info
    raise TypeError(
        f"{type(model).__name__} has no timm `feature_info`; inject supports timm models "
        "(ResNet family, ConvNeXt, Swin, ViT) and their features_only versions"
    )


def _existing_path(root: nn.Module, name: str) -> str | None:
    """``name`` as a submodule path of ``root``; features_only models flatten ``a.0`` to ``a_0``."""
    for candidate in (name, name.replace(".", "_")):
        try:
            root.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _layout(root: nn.Module) -> Layout:
    if hasattr(root, "patch_embed") and hasattr(root, "num_prefix_tokens"):
        return "tokens"
    fmt = getattr(root, "output_fmt", "NCHW")
    return "nhwc" if getattr(fmt, "value", fmt) == "NHWC" else "nchw"


def model_stages(model: nn.Module) -> list[StageInfo]:
    """The injectable stages of a timm model (plain or ``features_only``), in order.

    Args:
        model: A timm model, a ``FeatureListNet`` / ``FeatureGetterNet`` built with
            ``features_only=True``, or one of those after :func:`~gattn.models.inject`.

    Returns:
        One :class:`StageInfo` per stage present in the model; ``index`` runs from 1.

    Raises:
        TypeError: the model has no ``feature_info`` or no stage named like a known family.
    """
    prefix, root = ("model.", model.model) if isinstance(model, FeatureGetterNet) else ("", model)
    entries = [e for e in _feature_entries(root) if _STAGE_NAME.match(e["module"])]
    if not entries:
        names = [e["module"] for e in _feature_entries(root)]
        raise TypeError(
            f"{type(root).__name__}: no stage among its feature modules {names}; stages are "
            "named layerN (ResNet), stages.N (ConvNeXt), layers.N (Swin) or blocks.N (ViT)"
        )
    layout = _layout(root)
    extra: dict[str, Any] = {}
    if layout == "tokens":
        grid = getattr(root.patch_embed, "grid_size", None)
        extra = {
            "num_prefix_tokens": int(getattr(root, "num_prefix_tokens", 0)),  # see _layout
            "grid_size": tuple(grid) if grid is not None else None,
        }
    stages = []
    for index, entry in enumerate(entries, start=1):
        path = _existing_path(root, entry["module"])
        if path is None:  # features_only models drop the modules after their last output
            break
        stages.append(
            StageInfo(index, prefix + path, entry["num_chs"], entry["reduction"], layout, **extra)
        )
    return stages


def patch_grid(num_patches: int, grid_size: tuple[int, int] | None) -> tuple[int, int]:
    """Patch grid ``(h, w)`` of ``num_patches`` tokens.

    Args:
        num_patches: Patch tokens (prefix tokens excluded).
        grid_size: The model's grid at its configured image size, if fixed.

    Returns:
        ``grid_size`` when it holds ``num_patches`` tokens, else the square grid.

    Raises:
        ValueError: neither fits (e.g. a non-square dynamic image size, or masked tokens).
    """
    if grid_size is not None and grid_size[0] * grid_size[1] == num_patches:
        return grid_size
    side = math.isqrt(num_patches)
    if side * side == num_patches:
        return side, side
    raise ValueError(
        f"cannot lay {num_patches} patch tokens out on a grid (model grid {grid_size}); "
        "injected blocks need all patch tokens of a fixed or square image size"
    )


class LayoutAdapter(nn.Sequential):
    """Runs ``(B, C, H, W)`` blocks, in order, on a stage output of any layout.

    The input is converted once to NCHW, passed through the blocks and converted back to its
    own layout. For tokens, prefix (class/register) tokens bypass the blocks.

    Args:
        layout: Layout of the input (see :class:`StageInfo`).
        num_prefix_tokens: Prefix tokens in front of the patch tokens (``layout="tokens"``).
        grid_size: Patch grid at the model's image size (``layout="tokens"``).
    """

    def __init__(
        self,
        layout: Layout,
        num_prefix_tokens: int = 0,
        grid_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if layout not in ("nchw", "nhwc", "tokens"):
            raise ValueError(f"layout must be 'nchw', 'nhwc' or 'tokens', got {layout!r}")
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = grid_size

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks in order on NCHW ``x`` (``nn.Sequential.forward``, typed)."""
        for block in self:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "nchw":
            return self._blocks(x)
        if self.layout == "nhwc":
            return self._blocks(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        B, N, C = patches.shape
        h, w = patch_grid(N, self.grid_size)
        y = self._blocks(patches.transpose(1, 2).reshape(B, C, h, w))
        return torch.cat([prefix, y.flatten(2).transpose(1, 2)], dim=1)


class InjectedStage(nn.Sequential):
    """A stage followed by injected blocks: ``injected(stage(x, ...))``.

    A ``Sequential`` so that timm's gradient checkpointing (``checkpoint_seq``, which iterates
    stages) still works; extra forward arguments (e.g. a ViT block's ``attn_mask``) go to the
    stage, and ``grad_checkpointing`` (set on stages by timm's ``set_grad_checkpointing``) is
    forwarded to the stage as well.

    Args:
        stage: The original stage module.
        injected: The blocks, with the stage's layout.
    """

    stage: nn.Module  # children, registered by nn.Sequential under these names
    injected: LayoutAdapter

    def __init__(self, stage: nn.Module, injected: LayoutAdapter) -> None:
        super().__init__(OrderedDict(stage=stage, injected=injected))

    @property
    def grad_checkpointing(self) -> bool:
        return bool(getattr(self.stage, "grad_checkpointing", False))

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        # nn.Module.__setattr__ is annotated for tensors and modules only; timm reads this bool
        self.stage.grad_checkpointing = enable  # type: ignore[assignment]

    def forward(self, input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # ``input``: the name of nn.Sequential.forward's argument, which this overrides
        return self.injected(self.stage(input, *args, **kwargs))
