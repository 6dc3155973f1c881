"""Prepared splits as tensors, for the stages that hold a (small) split in memory.

The tune stage trains every trial from one in-memory copy of the training split and scores
each on the validation split; the finetune stage scores its model on the same validation
images to compare it with the search's best trial.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pipelines.prepare import open_split


def load_tensors(
    prepared: Path, split: str, limit: int | None, size: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``limit`` images of a split as one float tensor at ``size`` x ``size`` (masks
    resized nearest), their targets, and the task kind (``seg``/``cls``)."""
    from torchvision.transforms import v2

    from gattn.data.views import seg_eval_transform, to_float

    kind = json.loads((Path(prepared) / "splits.json").read_text())["kind"]
    transform = (
        seg_eval_transform(size)
        if kind == "seg"
        else v2.Compose([v2.Resize((size, size)), to_float()])
    )
    ds: Dataset = open_split(split, prepared, transform)
    n = len(ds) if limit is None else min(limit, len(ds))  # type: ignore[arg-type]
    images, targets = zip(*(ds[i] for i in range(n)), strict=True)
    return (
        torch.stack([torch.as_tensor(x) for x in images]),
        torch.as_tensor(torch.stack(targets) if kind == "seg" else targets),
        kind,
    )


def native_size(prepared: Path, largest: int | None = None) -> int:
    """The side a split is held at: a generated data set's one image side; for your own
    images (``folder-*`` tasks, any sizes) ``largest``, the largest resolution a trial trains
    at, so no image is forced to the first one's size (and a large first photo does not make
    every tensor large). Without ``largest``, the first training image's side."""
    info = json.loads((Path(prepared) / "splits.json").read_text())
    if largest is not None and str(info.get("task", "")).startswith("folder"):
        return int(largest)
    image = open_split("train", prepared)[0][0]
    return int(max(image.shape[-2:]))
