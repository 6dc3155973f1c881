"""The prepared data set as the stages open it: its splits, subsets and fingerprint.

The ``prepare`` stage writes ``data/prepared/splits.json`` (which images form the train, val
and test splits, the classes, where the images live, the task) and, for a generated benchmark,
the images themselves; a split names an image by its path under the images' root, or for a
torchvision data set by its key (``train/00042``: its part and index); a detection task also
gets ``coco/<split>.json``, each split's COCO annotations (:func:`coco_file`). Every later
stage reads the data through this module, never through ``prepare``'s code. A split is read as
a stream, never held: :class:`HeldSplit` names one at a fixed size, and :func:`stream` decodes
its batches file by file (the tune stage's trials read their own; the finetune stage scores its
model on the search's validation images the same way), so the memory of a process does not
grow with the data set.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from gattn.data import (
    CocoDetectionDataset,
    DetTarget,
    ImageFolderDataset,
    SegmentationFolderDataset,
    SyntheticDataset,
    TorchvisionDataset,
    as_path,
    collate_detection,
)
from pipelines.config import GENERATED, Task
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


def data_path(location: str) -> Path:
    """A folder of images named in ``params.yaml`` or ``splits.json``: a local path (made
    absolute), or an object-storage URL (``s3://bucket/prefix``, ``gs://...``) as a
    ``upath.UPath`` over fsspec (``s3fs``/``gcsfs``; credentials and endpoint from the usual
    environment, e.g. ``AWS_ENDPOINT_URL``), which has ``Path``'s API and which the data sets
    read like a disk (:func:`gattn.data.images.as_path`)."""
    if "://" in location:
        from upath import UPath

        return cast(Path, UPath(location))
    return Path(location).resolve()


def coco_file(prepared: Path, split: str) -> Path:
    """A detection split's COCO annotations in a prepared data folder (the images' file
    names relative to :func:`images_root`'s ``images/`` or to the root itself)."""
    return Path(prepared) / COCO_SPLITS / f"{split}.json"


def images_root(prepared: Path, info: dict[str, Any]) -> Path:
    """Where the images of a prepared data set live (inside ``prepared`` when generated, or
    on object storage: :func:`data_path`)."""
    root = str(info["root"])
    if "://" in root or Path(root).is_absolute():
        return data_path(root)
    return Path(prepared) / root


def sample_name(sample: Any, root: Path) -> str:
    """How ``splits.json`` names a data set's sample (its first element): a torchvision set's
    key as it is, an image path relative to the images' ``root``."""
    return sample if isinstance(sample, str) else as_path(sample).relative_to(root).as_posix()


def open_split(
    split: str,
    prepared: Path = PREPARED,
    transform: Any = None,
    large: bool = False,
    decode_size: int | None = None,
) -> Split:
    """The ``train``/``val``/``test`` split (or all the large images) of a prepared data set;
    ``decode_size``: a ``folder-cls`` set's JPEGs decoded at a reduced scale no smaller than
    that side (for a ``transform`` that resizes to it; :class:`gattn.data.ImageFolderDataset`)."""
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
        full = ImageFolderDataset(root, transform, check="none", decode_size=decode_size)
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
    """The first ``limit`` samples of ``ds`` (all of them for ``None``), a view of the same
    full data set (``.dataset``)."""
    return Subset(ds.dataset, ds.indices[:limit]) if limit else ds


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


def held_transform(kind: Task, size: int) -> Any:
    """How the tune stage holds each image: resized to ``size`` x ``size`` (a mask nearest, a
    detection target's boxes rescaled), float in [0, 1]."""
    from torchvision.transforms import v2

    from gattn.data.views import seg_eval_transform, to_float

    return (
        seg_eval_transform(size)
        if kind in ("seg", "det")
        else v2.Compose([v2.Resize((size, size)), to_float()])
    )


class SkipCounted(Dataset[tuple[torch.Tensor, Any, int]]):
    """A split whose samples say how many unreadable files were skipped to load them.

    The folder data sets read the next good sample in place of a file that fails to decode
    and count it (``replaced``, :mod:`gattn.data.datasets`); in a ``DataLoader`` worker that
    count is the worker's own copy's, so it travels with each sample instead:
    ``(image, target, skipped)``, image and target as plain tensors (a detection target as
    its ``{"boxes", "labels", "image_id"}`` dict).
    """

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    @property
    def detection(self) -> bool:
        """Whether the targets are detection dicts (batched by :func:`collate_counted`)."""
        return isinstance(self.split.dataset, CocoDetectionDataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any, int]:
        before = getattr(self.split.dataset, "replaced", 0)
        image, target = self.split[index]
        skipped = getattr(self.split.dataset, "replaced", 0) - before
        target = target if isinstance(target, dict) else torch.as_tensor(target)
        return torch.as_tensor(image).as_subclass(torch.Tensor), target, skipped


def collate_counted(
    batch: Sequence[tuple[torch.Tensor, Any, int]],
) -> tuple[torch.Tensor, list[DetTarget], torch.Tensor]:
    """A batch of detection samples of :class:`SkipCounted`: stacked images, the targets as
    a list (:func:`gattn.data.collate_detection`), the skipped counts as a tensor."""
    images, targets = collate_detection([(image, target) for image, target, _ in batch])
    return images, targets, torch.tensor([skipped for _, _, skipped in batch])


@dataclass(frozen=True)
class HeldSplit:
    """The first ``limit`` images of a prepared ``split``, each resized to ``size`` px
    (:func:`held_transform`), read as a stream: plain values, so a trial or worker receives it
    pickled and reads its own batches from the files, and no process holds the split.

    Attributes:
        prepared: The prepared data folder.
        split: ``train``, ``val`` or ``test``.
        limit: Images kept (None: all).
        size: The side each image is resized to.
        kind: The task's targets, ``seg``, ``cls`` or ``det``.
    """

    prepared: str
    split: str
    limit: int | None
    size: int
    kind: Task

    def open(self) -> SkipCounted:
        """The split's samples, decoded one at a time as they are read."""
        transform = held_transform(self.kind, self.size)
        split = open_split(self.split, Path(self.prepared), transform, decode_size=self.size)
        return SkipCounted(subset(split, self.limit))


def held_split(prepared: Path, split: str, limit: int | None, size: int) -> HeldSplit:
    """:class:`HeldSplit` of a prepared data folder (its task kind read from ``splits.json``),
    named by its absolute path: Ray Tune runs each trial in a folder of its own."""
    kind: Task = read_splits(prepared)["kind"]
    return HeldSplit(str(Path(prepared).resolve()), split, limit, size, kind)


def stream(
    data: SkipCounted,
    batch_size: int = 64,
    batches: Iterable[Sequence[int]] | None = None,
    workers: int = 0,
) -> DataLoader[tuple[torch.Tensor, Any, int]]:
    """Batches of ``data`` in order (``batch_size``), or the given index ``batches``, decoded
    by ``workers`` processes (0: in this one); each batch is ``(images, targets, skipped)``
    (detection targets: a list of dicts, :func:`collate_counted`).

    The loader draws its workers' seeds from a generator of its own, not torch's global one,
    so reading data leaves the draws of model initialisation and dropout as they were. Images
    on object storage are read by workers started afresh (``forkserver``), each with its own
    connection: fsspec's file systems refuse to run in a forked copy of the process that made
    them.
    """
    remote = not isinstance(getattr(data.split.dataset, "root", None), Path | None)
    options: dict[str, Any] = {"num_workers": workers, "generator": torch.Generator()}
    if data.detection:
        options["collate_fn"] = collate_counted
    if workers and remote:
        options["multiprocessing_context"] = "forkserver"
    if batches is not None:
        return DataLoader(data, batch_sampler=batches, **options)  # type: ignore[arg-type]
    return DataLoader(data, batch_size=batch_size, **options)


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
