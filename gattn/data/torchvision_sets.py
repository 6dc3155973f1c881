"""Image classification data sets of ``torchvision.datasets`` by name, read in their own layout.

:class:`TorchvisionDataset` opens the train and test parts of a torchvision data set (e.g.
``FashionMNIST``: ``root/FashionMNIST/raw/*-ubyte``; ``CIFAR10``:
``root/cifar-10-batches-py/``) and yields its samples as :class:`~gattn.data.ImageFolderDataset`
does: an RGB ``tv_tensors.Image`` (uint8, C x H x W; greyscale repeated to three channels) and
a class index. Nothing is re-encoded: torchvision reads its own files, and each sample is named
by a stable key, ``train/00042`` or ``test/00007`` (its part and its index in that part).

The names supported are those with a standard train/test split (:data:`TRAIN_TEST`). The
MNIST family's files are published gzipped (``train-images-idx3-ubyte.gz``; Debian's
``dataset-fashion-mnist`` package installs them in ``/usr/share/datasets/fashion-mnist/``), but
torchvision without ``download=True`` looks for them uncompressed: :func:`unpack_gzipped`
extracts the ``.gz`` files it finds in the raw folder (the data set does so when it opens). A
data set that is not there is a :class:`~gattn.data.DataLayoutError` that shows the expected
layout and how to get the files.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors

from gattn.data.datasets import DataLayoutError
from gattn.data.images import to_mode
from gattn.data.views import to_float

__all__ = ["PARTS", "TRAIN_TEST", "TorchvisionDataset", "sample_key", "unpack_gzipped"]

PARTS = ("train", "test")  # the parts of a data set, in the order of its samples
_TRAIN = ({"train": True}, {"train": False})
_SPLIT = ({"split": "train"}, {"split": "test"})
# name -> the constructor arguments of its train part and of its test part. Imagenette has no
# labelled test part: its ``val`` part is the test part here.
TRAIN_TEST: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "MNIST": _TRAIN,
    "FashionMNIST": _TRAIN,
    "KMNIST": _TRAIN,
    "QMNIST": _TRAIN,
    "USPS": _TRAIN,
    "CIFAR10": _TRAIN,
    "CIFAR100": _TRAIN,
    "SVHN": _SPLIT,
    "STL10": _SPLIT,
    "GTSRB": _SPLIT,
    "Food101": _SPLIT,
    "Flowers102": _SPLIT,
    "DTD": _SPLIT,
    "Country211": _SPLIT,
    "RenderedSST2": _SPLIT,
    "StanfordCars": _SPLIT,
    "FGVCAircraft": ({"split": "trainval"}, {"split": "test"}),
    "OxfordIIITPet": ({"split": "trainval"}, {"split": "test"}),
    "Imagenette": ({"split": "train"}, {"split": "val"}),
}
# Debian packages that install a data set's published files: (package, folder).
DEBIAN = {"FashionMNIST": ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")}


def sample_key(part: str, index: int, size: int) -> str:
    """The name of sample ``index`` of a part of ``size`` samples: ``train/00042`` (at least
    five digits, as many as the part's largest index needs)."""
    return f"{part}/{index:0{max(5, len(str(size - 1)))}d}"


def _mnist_files(name: str) -> list[str] | None:
    """The published (gzipped) file names of an MNIST-family data set, or None for others."""
    from torchvision import datasets

    cls = getattr(datasets, name)
    resources = getattr(cls, "resources", None)
    if not (issubclass(cls, datasets.MNIST) and isinstance(resources, list)):
        return None  # QMNIST and the rest: other files, other folders
    return [str(filename) for filename, _md5 in resources]


def unpack_gzipped(name: str, root: str | os.PathLike[str]) -> list[Path]:
    """Extract the gzipped files of an MNIST-family data set in ``root/<name>/raw/`` whose
    uncompressed copy is missing (each written to a temporary name, then renamed, so an
    interrupted extraction leaves nothing torchvision would take for the file).

    Returns:
        The files written (none for a data set of another family, or when all are there).

    Raises:
        DataLayoutError: a ``.gz`` file is corrupt or the folder is not writable.
    """
    files = _mnist_files(name)
    raw = Path(root) / name / "raw"
    written: list[Path] = []
    for filename in files or []:
        packed, plain = raw / filename, raw / filename.removesuffix(".gz")
        if plain == packed or plain.is_file() or not packed.is_file():
            continue
        partial = plain.with_name(f".{plain.name}.partial")
        try:
            with gzip.open(packed, "rb") as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, plain)
        except OSError as err:
            partial.unlink(missing_ok=True)
            raise DataLayoutError(
                f"cannot extract {packed} into {raw}: {err}; make the folder writable or "
                f"extract it by hand (gunzip -k {packed})",
                layout(name),
            ) from None
        written.append(plain)
    return written


def layout(name: str) -> str:
    """Where torchvision looks for the files of data set ``name`` under its root."""
    files = _mnist_files(name)
    if files is None:
        return f"root/  (the files torchvision.datasets.{name}(root) reads, in its own layout)"
    width = max(len(f) for f in files)
    lines = [f"      {f.removesuffix('.gz'):{width}}(or {f}: extracted when opened)" for f in files]
    return "\n".join(["root/", f"  {name}/", "    raw/", *lines])


def how_to_get(name: str) -> str:
    """How to get the files of data set ``name``: torchvision's download, or a Debian package."""
    how = "Get it with download=True (torchvision fetches it; needs a network)"
    if name in DEBIAN:
        package, folder = DEBIAN[name]
        how += (
            f", or on Debian/Ubuntu: apt-get install {package}, then link its files into the "
            f"raw folder: mkdir -p ROOT/{name}/raw && ln -s {folder}/*.gz ROOT/{name}/raw/"
        )
    return how + "."


def _targets(part: Any) -> list[int]:
    """The class index of every sample of a torchvision data set, without decoding images
    where it keeps them (``targets``, ``labels``, ``_labels``, ``_samples``)."""
    for attr in ("targets", "labels", "_labels"):
        values = getattr(part, attr, None)
        if values is not None:
            return [int(v) for v in np.asarray(values, dtype=np.int64).ravel()]
    samples = getattr(part, "_samples", None)
    if samples is not None:
        return [int(s[1]) for s in samples]
    return [int(part[i][1]) for i in range(len(part))]  # decodes every image: slow, but right


def _class_names(part: Any, top: int) -> list[str]:
    """The data set's class names (the first of a tuple of synonyms), else ``0`` to ``top``
    (the largest class index found)."""
    names = getattr(part, "classes", None)
    if names is None or len(names) <= top:
        return [str(k) for k in range(top + 1)]
    return [n if isinstance(n, str) else str(n[0]) for n in names]


class TorchvisionDataset(Dataset[tuple[Any, Any]]):
    """The train and test parts of a ``torchvision.datasets`` classification set, as samples
    named ``train/NNNNN`` and ``test/NNNNN`` (train part first).

    Args:
        name: a class of ``torchvision.datasets`` in :data:`TRAIN_TEST`, e.g. ``"FashionMNIST"``.
        root: the folder torchvision reads (e.g. holding ``FashionMNIST/raw/``).
        transform: applied to each ``tv_tensors.Image`` (uint8, C x H x W); default: to float
            in [0, 1].
        download: let torchvision download the files into ``root`` if they are missing.
        mode: PIL mode images are converted to (``"RGB"``: greyscale repeated, or ``"L"``).

    Raises:
        ValueError: ``name`` is not a supported data set (the message lists them).
        DataLayoutError: the files are not in ``root`` (the message says how to get them).
    """

    task = "cls"

    def __init__(
        self,
        name: str,
        root: str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        download: bool = False,
        mode: str = "RGB",
    ) -> None:
        if name not in TRAIN_TEST:
            raise ValueError(
                f"data set {name!r} is not supported; expected one of {', '.join(TRAIN_TEST)}"
            )
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode={mode!r} is invalid, expected 'RGB' or 'L'")
        from torchvision import datasets

        self.name, self.root, self.mode = name, Path(root), mode
        self.transform = transform if transform is not None else to_float()
        self.skipped: list[tuple[str, str]] = []  # the interface of the folder data sets
        unpack_gzipped(name, self.root)  # before a download: files already there are used
        cls = getattr(datasets, name)
        self.parts: dict[str, Any] = {}
        for part, kwargs in zip(PARTS, TRAIN_TEST[name], strict=True):
            try:
                self.parts[part] = cls(str(self.root), download=download, **kwargs)
            except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found ..."
                raise DataLayoutError(
                    f"{name} ({part} part) could not be read from {self.root} (torchvision: "
                    f"{err}). {how_to_get(name)}",
                    layout(name),
                ) from None
        self.samples: list[tuple[str, int]] = []
        self._where: list[tuple[str, int]] = []  # (part, index in the part) of each sample
        for part, data in self.parts.items():
            targets = _targets(data)
            self.samples += [(sample_key(part, i, len(targets)), t) for i, t in enumerate(targets)]
            self._where += [(part, i) for i in range(len(targets))]
        self.targets = [t for _, t in self.samples]
        self.classes = _class_names(self.parts["train"], max(self.targets))
        self.num_classes = len(self.classes)

    def part_size(self, part: str) -> int:
        """How many samples the ``train`` or ``test`` part holds."""
        return len(self.parts[part])

    def image(self, index: int) -> Image.Image:
        """Sample ``index``'s image as a PIL image in the data set's ``mode``, untransformed."""
        part, i = self._where[index]
        picture = self.parts[part][i][0]
        if not isinstance(picture, Image.Image):  # every supported set returns PIL images
            raise TypeError(f"{self.name}[{i}] is a {type(picture).__name__}, not a PIL image")
        return to_mode(picture, self.mode)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        pixels = np.asarray(self.image(index))
        image = tv_tensors.Image(
            torch.from_numpy(pixels.copy()).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)
        )
        return self.transform(image), self.samples[index][1]
