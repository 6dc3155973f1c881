"""Rename the tensors of another library's checkpoint to the names of the timm model it fits.

Weights trained elsewhere name their tensors in their own library's layout: torchvision's
MobileNetV2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks")
calls timm's ``blocks.1.0.conv_pw`` ``features.2.conv.0.0``. A converter maps such a state dict
onto timm's names, tensors unchanged, so the one loader
(:func:`gattn.models.pretrained.load_pretrained`) can match it by name and shape. Converters
are registered by the name of the layout they read (:data:`CONVERTERS`), each with a test that
recognises its layout from the tensor names, so a file in a known layout loads without being
told which (:func:`detect_layout`)::

    weights = torch.load("mobilenet_v2-b0353104.pth", weights_only=True)
    timm_names = convert_state_dict(weights, "torchvision_mobilenet_v2")

A new layout is one function and :func:`register_converter`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from itertools import accumulate

import torch

__all__ = [
    "CONVERTERS",
    "Converter",
    "convert_state_dict",
    "detect_layout",
    "register_converter",
]

StateDict = Mapping[str, torch.Tensor]
ConvertFn = Callable[[StateDict], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Converter:
    """A registered layout.

    Attributes:
        name: The layout's name, e.g. ``"torchvision_mobilenet_v2"``.
        convert: Source state dict -> the same tensors under timm's names (names it does not
            know are kept, so the loader reports them as unexpected).
        detect: Whether a collection of tensor names is in this layout.
        targets: The timm models the converted weights fit, e.g. ``("mobilenetv2_100",)``.
    """

    name: str
    convert: ConvertFn
    detect: Callable[[Collection[str]], bool]
    targets: tuple[str, ...]


CONVERTERS: dict[str, Converter] = {}


def register_converter(
    name: str, *, detect: Callable[[Collection[str]], bool], targets: tuple[str, ...]
) -> Callable[[ConvertFn], ConvertFn]:
    """Register the decorated function as the converter of layout ``name``.

    Args:
        name: The layout's name (unique).
        detect: Recognises the layout from a state dict's names.
        targets: The timm models the converted weights fit.
    """

    def decorate(fn: ConvertFn) -> ConvertFn:
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} is already registered")
        CONVERTERS[name] = Converter(name, fn, detect, targets)
        return fn

    return decorate


def detect_layout(names: Collection[str]) -> str | None:
    """The registered layout whose test recognises ``names``, or ``None`` (timm's own names
    or an unknown layout: loaded as they are)."""
    found = [c.name for c in CONVERTERS.values() if c.detect(names)]
    if len(found) > 1:
        raise ValueError(f"state dict matches several layouts {found}; name one explicitly")
    return found[0] if found else None


def convert_state_dict(weights: StateDict, layout: str | None) -> dict[str, torch.Tensor]:
    """``weights`` under timm's names.

    Args:
        weights: A state dict.
        layout: A key of :data:`CONVERTERS`, or ``None``: the names are timm's already.

    Raises:
        ValueError: an unknown layout (the message lists the registered ones).
    """
    if layout is None:
        return dict(weights)
    if layout not in CONVERTERS:
        raise ValueError(f"unknown weights layout {layout!r}; registered: {sorted(CONVERTERS)}")
    return CONVERTERS[layout].convert(weights)


# --------------------------------------------------------------------------------------------
# torchvision MobileNetV2 -> timm mobilenetv2_*

# Sandler et al. 2018, Table 2: how often each bottleneck row repeats (``n``). torchvision's
# ``features.1`` .. ``features.17`` are these blocks in order; timm groups them into
# ``blocks.<row>.<repeat>``. The same for every width multiplier.
_MBV2_REPEATS = (1, 2, 3, 4, 3, 3, 1)
_MBV2_STARTS = (1, *(1 + s for s in accumulate(_MBV2_REPEATS)))  # features index of each row
_MBV2_LAST = _MBV2_STARTS[-1]  # features.18: the final 1x1 conv
# Inside a block: expansion 1 (the first row) has no expanding 1x1 conv.
_MBV2_FIRST_BLOCK = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_MBV2_BLOCK = {
    "conv.0.0": "conv_pw",  # expand 1x1
    "conv.0.1": "bn1",
    "conv.1.0": "conv_dw",  # depthwise 3x3
    "conv.1.1": "bn2",
    "conv.2": "conv_pwl",  # linear bottleneck 1x1
    "conv.3": "bn3",
}
_MBV2_FIXED = {
    "features.0.0": "conv_stem",
    "features.0.1": "bn1",
    f"features.{_MBV2_LAST}.0": "conv_head",
    f"features.{_MBV2_LAST}.1": "bn2",
    "classifier.1": "classifier",  # classifier.0 is dropout
}


def _is_torchvision_mobilenet_v2(names: Collection[str]) -> bool:
    return {
        "features.0.0.weight",
        "features.1.conv.0.0.weight",
        "features.2.conv.1.0.weight",
        f"features.{_MBV2_LAST}.0.weight",
    } <= set(names)


def _mbv2_module(module: str) -> str:
    """timm's name of a torchvision MobileNetV2 module (the name itself if unknown)."""
    if module in _MBV2_FIXED:
        return _MBV2_FIXED[module]
    head, _, rest = module.partition(".")
    index, _, inner = rest.partition(".")
    if head != "features" or not index.isdigit() or not 1 <= int(index) < _MBV2_LAST:
        return module
    i = int(index)
    row = max(r for r, start in enumerate(_MBV2_STARTS[:-1]) if start <= i)
    table = _MBV2_FIRST_BLOCK if row == 0 else _MBV2_BLOCK
    if inner not in table:
        return module
    return f"blocks.{row}.{i - _MBV2_STARTS[row]}.{table[inner]}"


@register_converter(
    "torchvision_mobilenet_v2",
    detect=_is_torchvision_mobilenet_v2,
    targets=("mobilenetv2_050", "mobilenetv2_075", "mobilenetv2_100", "mobilenetv2_140"),
)
def torchvision_mobilenet_v2(weights: StateDict) -> dict[str, torch.Tensor]:
    """torchvision's ``mobilenet_v2`` state dict under the names of timm's
    ``mobilenetv2_*`` (same width multiplier): stem, the 17 inverted-residual blocks, the
    final 1x1 conv and its norm, the classifier."""
    out = {}
    for name, tensor in weights.items():
        module, _, leaf = name.rpartition(".")
        out[f"{_mbv2_module(module)}.{leaf}"] = tensor
    return out
