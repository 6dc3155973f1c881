"""The prepared data set as the stages open it: its splits, subsets and fingerprint.

The ``prepare`` stage writes ``data/prepared/splits.json`` (which images form the train, val
and test splits, the classes, where the images live, the task) and, for a generated benchmark,
the images themselves; a split names an image by its path under the images' root, or for a
torchvision data set by its key (``train/00042``: its part and index); a detection task also
gets ``coco/<split>.json``, each split's COCO annotations (:func:`coco_file`). Every later
stage reads the data through this module, never through ``prepare``'s code.
:func:`load_tensors` holds a (small) split in memory as one tensor: the tune stage trains every
trial from one copy, and the finetune stage scores its model on the search's validation images.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from gattn.data import (
    CocoDetectionDataset,
    ImageFolderDataset,
    SegmentationFolderDataset,
    SyntheticDataset,
    TorchvisionDataset,
)
from pipelines.config import GENERATED, ParamsError, Task
from pipelines.paths import COCO_SPLITS, PREPARED, SPLITS_JSON

SPLITS = ("train", "val", "test")

Sample = tuple[Any, Any]  # (image, target), as the split's transform leaves them
# The opened images of a split: a sized view of the full data set (what DataLoader and len()
# both take, unlike a bare torch Dataset).
Split = Subset[Sample]


def read_splits(prepared: Path = PREPARED) -> dict[str, Any]:
    """``splits.json`` of a prepared data folder.

    Raises:
        FileNotFoundError: the folder holds no prepared data (the message says the fix).
    """
    path = Path(prepared) / SPLITS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; run `gattn prepare` first (or pass --data)")
    return json.loads(path.read_text())


def coco_file(prepared: Path, split: str) -> Path:
    """A detection split's COCO annotations in a prepared data folder (the images' file
    names relative to :func:`images_root`'s ``images/`` or to the root itself)."""
    return Path(prepared) / COCO_SPLITS / f"{split}.json"


def require_supported(info: dict[str, Any], stage: str) -> None:
    """Stop ``stage`` on a task kind it does not handle yet (detection, for now).

    Raises:
        ParamsError: the prepared data is a detection task.
    """
    if info.get("kind") == "det":
        raise ParamsError(
            f"data.task {info.get('task')!r}: detection is not yet supported by stage {stage} "
            "(the prepare stage writes its data); use a segmentation or classification task"
        )


def images_root(prepared: Path, info: dict[str, Any]) -> Path:
    """Where the images of a prepared data set live (inside ``prepared`` when generated)."""
    root = Path(info["root"])
    return root if root.is_absolute() else Path(prepared) / root


def sample_name(sample: Any, root: Path) -> str:
    """How ``splits.json`` names a data set's sample (its first element): a torchvision set's
    key as it is, an image path relative to the images' ``root``."""
    return sample if isinstance(sample, str) else Path(sample).relative_to(root).as_posix()


def open_split(
    split: str, prepared: Path = PREPARED, transform: Any = None, large: bool = False
) -> Split:
    """The ``train``/``val``/``test`` split (or all the large images) of a prepared data set."""
    prepared = Path(prepared)
    info = read_splits(prepared)
    det = info["kind"] == "det"
    if large:
        if not info.get("large"):
            raise FileNotFoundError(f"{prepared} has no large images (data.large.num_samples: 0)")
        folder = prepared / info["large"]
        large_set = (CocoDetectionDataset if det else SyntheticDataset)(
            folder, transform=transform, check="none"
        )
        return Subset(large_set, range(len(large_set)))
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {SPLITS}")
    root = images_root(prepared, info)
    full: (
        SyntheticDataset
        | ImageFolderDataset
        | SegmentationFolderDataset
        | TorchvisionDataset
        | CocoDetectionDataset
    )
    if det:
        full = CocoDetectionDataset(root, transform=transform, check="none")
    elif info["task"] in GENERATED:
        full = SyntheticDataset(root, transform=transform, check="none")
    elif info["task"] == "torchvision-cls":
        full = TorchvisionDataset(info["dataset"], root, transform=transform)
    elif info["task"] == "folder-cls":
        full = ImageFolderDataset(root, transform=transform, check="none")
    else:
        full = SegmentationFolderDataset(root, len(info["classes"]), transform, check="none")
    position = {sample_name(p, root): i for i, (p, _) in enumerate(full.samples)}
    wanted = info[split]
    missing = [p for p in wanted if p not in position]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) of split {split!r} are gone from {root} (e.g. {missing[0]}); "
            "rerun `gattn prepare`"
        )
    return Subset(full, [position[p] for p in wanted])


def subset(ds: Split, limit: int | None) -> Split:
    """The first ``limit`` samples of ``ds`` (all of them for ``None``)."""
    return Subset(ds, range(min(len(ds), limit))) if limit else ds


def data_fingerprint(prepared: Path) -> str:
    """A hash of the prepared data's description: its splits (for a torchvision data set with
    a hash of its images and labels), a detection task's annotations and, if generated, its
    manifest. Part of every Ray run name, so that a run never resumes on other data."""
    prepared = Path(prepared)
    digest = hashlib.sha256((prepared / SPLITS_JSON).read_bytes())
    for split in SPLITS:  # your folder-det boxes may change under the same file names
        if coco_file(prepared, split).is_file():
            digest.update(coco_file(prepared, split).read_bytes())
    manifest = images_root(prepared, read_splits(prepared)) / "manifest.json"
    if manifest.is_file():
        digest.update(manifest.read_bytes())
    return digest.hexdigest()


def load_tensors(
    prepared: Path, split: str, limit: int | None, size: int
) -> tuple[torch.Tensor, torch.Tensor, Task]:
    """The first ``limit`` images of a split as one float tensor at ``size`` x ``size`` (masks
    resized nearest), their targets, and the task kind (``seg``/``cls``)."""
    from torchvision.transforms import v2

    from gattn.data.views import seg_eval_transform, to_float

    kind: Task = read_splits(prepared)["kind"]
    transform = (
        seg_eval_transform(size)
        if kind == "seg"
        else v2.Compose([v2.Resize((size, size)), to_float()])
    )
    ds = subset(open_split(split, prepared, transform), limit)
    images, targets = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return (
        torch.stack([torch.as_tensor(x) for x in images]),
        torch.as_tensor(torch.stack(targets) if kind == "seg" else targets),
        kind,
    )


def native_size(prepared: Path, largest: int | None = None) -> int:
    """The side a split is held at: a generated data set's one image side, or a torchvision
    data set's when its images share one size; for images of any sizes (your ``folder-*``
    images, some torchvision sets) ``largest``, the largest resolution a trial trains at, so no
    image is forced to the first one's size (and a large first photo does not make every
    tensor large). Without ``largest``, the first training image's side."""
    info = read_splits(prepared)
    if info.get("image_size"):  # one size throughout (prepare found it)
        return int(info["image_size"])
    if largest is not None and info.get("task") not in GENERATED:
        return int(largest)
    image = open_split("train", prepared)[0][0]
    return int(max(image.shape[-2:]))
