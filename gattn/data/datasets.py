"""Image data sets on disk: ImageFolder classification, images/ + masks/ segmentation, and the
generated benchmark (:mod:`gattn.data.synthetic`); COCO detection in :mod:`gattn.data.detection`.

Bad files never stop training. At index time every image (and mask) is opened and checked with
PIL's cheap ``verify()``; at load time a file that still fails to decode, or a mask with the wrong
size or out-of-range values, is replaced by the next good sample. Both cases warn with the file
name and are recorded in ``dataset.skipped`` as ``(path, reason)`` (once per file);
``dataset.replaced`` counts the samples read in place of a bad one (each time). (Load-time
skips inside DataLoader worker processes are recorded in that worker's copy of the data set;
the index-time check is what a data report counts.) A missing, empty or mis-laid folder is a
:class:`DataLayoutError` that shows the expected layout.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors

from gattn.data.images import as_path, open_file, open_image, oriented_size
from gattn.data.synthetic import read_manifest
from gattn.data.views import to_float

__all__ = [
    "IGNORE_INDEX",
    "IMG_EXTENSIONS",
    "DataLayoutError",
    "ImageFolderDataset",
    "SegmentationFolderDataset",
    "SyntheticDataset",
    "infer_num_classes",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IGNORE_INDEX = 255
_LOAD_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

CLS_LAYOUT = """root/
  class_a/
    img_001.png
    img_002.jpg
  class_b/
    img_003.png"""
SEG_LAYOUT = """root/
  images/
    scene_001.png
    scene_002.jpg
  masks/
    scene_001.png   (same stem; one channel, values = class ids, 255 = ignore)
    scene_002.png"""


class DataLayoutError(ValueError):
    """A data folder is missing, empty or not laid out as expected (``layout``: the expected
    one, shown after the problem; None: the problem says it all)."""

    def __init__(self, problem: str, layout: str | None) -> None:
        super().__init__(f"{problem}\nExpected layout:\n{layout}" if layout else problem)


def _is_image(path: Path) -> bool:
    # The name first: on object storage is_file() is a request.
    return (
        path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _check_dir(root: Path, layout: str) -> None:
    if not root.is_dir():
        raise DataLayoutError(f"{root} does not exist or is not a folder", layout)


MASK_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B")  # one channel of class ids


def _check_mask_header(mask: Image.Image, path: Path, size: tuple[int, int]) -> None:
    """A mask must be one channel of class ids, the size of its image as shown (both after
    their EXIF orientation)."""
    if mask.mode not in MASK_MODES:
        raise ValueError(f"mask {path.name} has mode {mask.mode}, expected one channel")
    if oriented_size(mask) != size:
        raise ValueError(f"mask {path.name} is {oriented_size(mask)}, its image {size}")


class _ImageDataset(Dataset[tuple[Any, Any]]):
    """Shared indexing, checking and fault-tolerant loading of (image, target) samples.

    Args:
        samples: ``(image path, class index)`` for ``task="cls"``, ``(image path, mask path)``
            for ``task="seg"``, ``(image path, its annotations)`` for ``task="det"``.
        task: ``"cls"``, ``"seg"`` or ``"det"``.
        num_classes: number of classes (masks must hold values below it or ``ignore_index``).
        transform: applied to the image (cls) or jointly to ``(image, target)`` (seg: the mask,
            det: see :mod:`gattn.data.detection`), as ``tv_tensors`` (images uint8); default:
            image to float in [0, 1].
        check: ``"verify"`` (PIL verify, cheap), ``"decode"`` (full decode) or ``"none"``.
        mode: PIL mode images are converted to (``"RGB"`` or ``"L"``).
        ignore_index: mask value excluded from the loss.
        decode_size: classification images only (a mask must match its image pixel for
            pixel): decode JPEGs at a reduced scale no smaller than this side
            (:func:`gattn.data.images.open_image`'s ``min_side``), for a transform that
            resizes them to it.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, Any]],
        *,
        task: Literal["cls", "seg", "det"],
        num_classes: int,
        transform: Callable[..., Any] | None,
        check: Literal["verify", "decode", "none"],
        mode: str,
        ignore_index: int,
        layout: str,
        decode_size: int | None = None,
    ) -> None:
        if check not in ("verify", "decode", "none"):
            raise ValueError(f"check={check!r} is invalid, expected 'verify', 'decode' or 'none'")
        self.task, self.num_classes, self.mode = task, num_classes, mode
        self.ignore_index = ignore_index
        self.decode_size = decode_size if task == "cls" else None
        self.transform = transform if transform is not None else to_float()
        self.skipped: list[tuple[str, str]] = []
        self.replaced = 0  # samples read in place of an unreadable one (load time)
        self._bad: set[int] = set()
        self.samples = [s for s in samples if self._index_ok(s, check)]
        if not self.samples:
            raise DataLayoutError(f"no readable image among {len(samples)} file(s)", layout)

    def _skip(self, path: Path, reason: str) -> None:
        self.skipped.append((str(path), reason))
        warnings.warn(f"skipping unreadable sample {path}: {reason}", stacklevel=3)

    def _index_ok(self, sample: tuple[Path, Any], check: str) -> bool:
        if check == "none":
            return True
        paths = [sample[0], sample[1]] if self.task == "seg" else [sample[0]]
        try:
            size = None
            for path in paths:
                with open_file(path) as im:
                    if size is None:
                        size = oriented_size(im)
                        self._check_size(sample, size)
                    else:
                        _check_mask_header(im, path, size)
                    im.verify() if check == "verify" else im.load()
        except _LOAD_ERRORS as err:
            self._skip(sample[0], f"{type(err).__name__}: {err}")
            return False
        return True

    def _check_size(self, sample: tuple[Path, Any], size: tuple[int, int]) -> None:
        """Raise ValueError when a sample's image (``size``: width, height as shown) does not
        fit its target; a mask's size is checked with its header."""

    def _load_mask(self, path: Path, size: tuple[int, int]) -> np.ndarray:
        with open_file(path) as im:
            _check_mask_header(im, path, size)
            mask = np.asarray(ImageOps.exif_transpose(im))  # values untouched
        bad = ((mask < 0) | (mask >= self.num_classes)) & (mask != self.ignore_index)
        if bad.any():
            raise ValueError(
                f"mask {path.name} has values {np.unique(mask[bad])[:5].tolist()}, neither in "
                f"[0, num_classes={self.num_classes}) nor ignore_index={self.ignore_index}"
            )
        return mask.astype(np.uint8 if mask.max(initial=0) <= 255 else np.int64)

    def _load(self, sample: tuple[Path, Any]) -> tuple[tv_tensors.Image, Any]:
        image = np.asarray(open_image(sample[0], self.mode, self.decode_size))
        image = tv_tensors.Image(
            torch.from_numpy(image.copy()).reshape(*image.shape[:2], -1).permute(2, 0, 1)
        )
        return image, self._target(sample, image)

    def _target(self, sample: tuple[Path, Any], image: tv_tensors.Image) -> Any:
        """The target of a loaded sample: its class (cls) or its mask (seg)."""
        if self.task == "cls":
            return int(sample[1])
        mask = self._load_mask(sample[1], (image.shape[-1], image.shape[-2]))
        return tv_tensors.Mask(torch.from_numpy(mask))

    def _output(self, image: Any, target: Any) -> tuple[Any, Any]:
        """A sample as the data set returns it, after the joint transform (seg, det)."""
        return image, target.as_subclass(torch.Tensor).long()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        n = len(self.samples)
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                image, target = self._load(self.samples[i])
                self.replaced += step
                break
            except _LOAD_ERRORS as err:
                self._bad.add(i)
                self._skip(self.samples[i][0], f"{type(err).__name__}: {err}")
        else:
            raise RuntimeError(f"all {n} samples failed to load; see dataset.skipped")
        if self.task == "cls":
            return self.transform(image), target
        return self._output(*self.transform(image, target))


class ImageFolderDataset(_ImageDataset):
    """Classification data in ImageFolder layout: one sub-folder per class (sorted names).

    Args:
        root: the folder holding one sub-folder per class (on disk, or a path object of
            another file system such as ``upath.UPath("s3://...")``: :func:`as_path`).
        transform: applied to each ``tv_tensors.Image`` (uint8, C x H x W).
        check: index-time check, ``"verify"``, ``"decode"`` or ``"none"``.
        mode: PIL mode images are converted to.
        decode_size: decode JPEGs at a reduced scale no smaller than this side (for a
            transform that resizes to it; None: whole).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[..., Any] | None = None,
        check: Literal["verify", "decode", "none"] = "verify",
        mode: str = "RGB",
        decode_size: int | None = None,
    ) -> None:
        self.root = as_path(root)
        _check_dir(self.root, CLS_LAYOUT)
        self.classes = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )
        if not self.classes:
            loose = len(_images_in(self.root))
            found = f"{loose} image(s) directly in it" if loose else "nothing usable"
            raise DataLayoutError(f"{self.root} has no class sub-folders ({found})", CLS_LAYOUT)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        samples = [(p, i) for c, i in self.class_to_idx.items() for p in _images_in(self.root / c)]
        counts = Counter(i for _, i in samples)
        empty = [c for c, i in self.class_to_idx.items() if not counts[i]]
        if empty:
            raise DataLayoutError(
                f"{self.root}: class folder(s) without images: {empty}", CLS_LAYOUT
            )
        super().__init__(
            samples,
            task="cls",
            num_classes=len(self.classes),
            transform=transform,
            check=check,
            mode=mode,
            ignore_index=IGNORE_INDEX,
            layout=CLS_LAYOUT,
            decode_size=decode_size,
        )
        self.targets = [s[1] for s in self.samples]


def infer_num_classes(masks: Sequence[Path], ignore_index: int = IGNORE_INDEX) -> int:
    """Classes the masks hold: their largest value other than ``ignore_index``, plus one
    (unreadable masks are left to the data set's checks).

    Raises:
        DataLayoutError: no mask holds a class other than 0 (nothing to segment).
    """
    top = -1
    for path in masks:
        try:
            with open_file(path) as im:
                values = np.asarray(im)
        except _LOAD_ERRORS:
            continue
        values = values[values != ignore_index]
        if values.size:
            top = max(top, int(values.max()))
    if top < 1:
        raise DataLayoutError(
            f"the {len(masks)} mask(s) hold no class but 0 (and {ignore_index} = ignore): "
            "nothing to segment; check the masks' values (class ids, not colours)",
            SEG_LAYOUT,
        )
    return top + 1


class SegmentationFolderDataset(_ImageDataset):
    """Segmentation data as ``root/images/*`` + ``root/masks/*`` paired by file stem.

    Args:
        root: the folder holding ``images/`` and ``masks/`` (on disk or, as a path object,
            elsewhere: :func:`as_path`).
        num_classes: number of classes; mask values must be below it or ``ignore_index``.
            None: read from the masks (:func:`infer_num_classes`).
        transform: joint transform called as ``transform(image, mask)`` on ``tv_tensors``.
        check: index-time check, ``"verify"``, ``"decode"`` or ``"none"``.
        mode: PIL mode images are converted to.
        ignore_index: mask value excluded from the loss.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        num_classes: int | None,
        transform: Callable[..., Any] | None = None,
        check: Literal["verify", "decode", "none"] = "verify",
        mode: str = "RGB",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        self.root = as_path(root)
        _check_dir(self.root, SEG_LAYOUT)
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes={num_classes!r} is invalid, expected >= 1")
        missing = [d for d in ("images", "masks") if not (self.root / d).is_dir()]
        if missing:
            raise DataLayoutError(f"{self.root} lacks the folder(s) {missing}", SEG_LAYOUT)
        images = {p.stem: p for p in _images_in(self.root / "images")}
        masks = {p.stem: p for p in _images_in(self.root / "masks")}
        if not images:
            raise DataLayoutError(f"{self.root / 'images'} holds no images", SEG_LAYOUT)
        no_mask, no_image = sorted(images.keys() - masks), sorted(masks.keys() - images)
        if no_mask or no_image:
            raise DataLayoutError(
                f"{self.root}: names do not match: {len(no_mask)} image(s) without a mask "
                f"{no_mask[:5]}, {len(no_image)} mask(s) without an image {no_image[:5]}",
                SEG_LAYOUT,
            )
        samples = [(images[k], masks[k]) for k in sorted(images)]
        if num_classes is None:
            num_classes = infer_num_classes([m for _, m in samples], ignore_index)
        super().__init__(
            samples,
            task="seg",
            num_classes=num_classes,
            transform=transform,
            check=check,
            mode=mode,
            ignore_index=ignore_index,
            layout=SEG_LAYOUT,
        )


class SyntheticDataset(_ImageDataset):
    """A data set written by :func:`gattn.data.synthetic.generate`, read from its manifest.

    Args:
        root: the generated folder (holding ``manifest.json``).
        indices: sample indices to keep (e.g. one split); default all.
        transform: image transform (pathfinder) or joint transform (cue-seg).
        check: index-time check, ``"verify"``, ``"decode"`` or ``"none"``.
        mode: PIL mode images are converted to.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        indices: Sequence[int] | None = None,
        transform: Callable[..., Any] | None = None,
        check: Literal["verify", "decode", "none"] = "verify",
        mode: str = "RGB",
    ) -> None:
        self.root = as_path(root)
        self.manifest = read_manifest(self.root)
        if self.manifest["kind"] == "det":
            raise ValueError(
                f"{self.root} holds a detection data set: open it with "
                "gattn.data.CocoDetectionDataset"
            )
        self.classes: list[str] = list(self.manifest["class_names"])
        records = self.manifest["samples"]
        chosen = range(len(records)) if indices is None else indices
        key = "mask" if self.manifest["kind"] == "seg" else "label"
        samples = [
            (
                self.root / records[i]["image"],
                self.root / records[i][key] if key == "mask" else records[i][key],
            )
            for i in chosen
        ]
        layout = "a folder written by gattn.data.synthetic.generate (manifest.json + images/)"
        super().__init__(
            samples,
            task=self.manifest["kind"],
            num_classes=len(self.classes),
            transform=transform,
            check=check,
            mode=mode,
            ignore_index=IGNORE_INDEX,
            layout=layout,
        )
