"""``prepare`` stage: generate or index the data set, split it, report on it.

Reads ``seed``, ``tracking`` and ``data`` from params.yaml. Writes

- ``data/prepared/``: ``dataset/`` (the generated benchmark, when ``data.task`` is one),
  ``large/`` (large generated test images for sliding-window evaluation), ``splits.json``
  (train/val/test image paths, or keys of a torchvision data set, classes, where the images
  live; detection: ``category_ids``, the COCO id of each label), ``coco/<split>.json``
  (detection: each split's COCO annotations, validated, boxes clipped, crowd boxes dropped);
- ``reports/prepare/``: ``metrics.json`` (``dvc metrics``), ``class_balance.csv`` and
  ``samples.png`` (``dvc plots``), ``report.json`` (skipped files, sizes).

Class balance is the fraction of samples (classification), pixels (segmentation) or boxes
(detection) of each class.

Everything is built in a temporary folder and moved into place at the end, so an interrupted
run never leaves a half-written ``data/prepared`` that looks complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from gattn.data import (
    CocoDetectionDataset,
    DataLayoutError,
    ImageFolderDataset,
    SegmentationFolderDataset,
    SyntheticDataset,
    TorchvisionDataset,
    coco_dict,
    generate,
    open_file,
    open_image,
    oriented_size,
    to_mode,
)
from gattn.diagnostics import sample_grid
from pipelines.config import GENERATED, Params, Task, add_params_arguments, load_params
from pipelines.data import SPLITS, coco_file, data_path, sample_name
from pipelines.io import publish_dir, staging_dir, write_csv, write_json
from pipelines.paths import PREPARE_REPORTS, PREPARED, SPLITS_JSON


def split_indices(n: int, val: float, test: float, seed: int) -> dict[str, list[int]]:
    """A seeded random partition of ``range(n)`` into train/val/test, each non-empty."""
    n_val, n_test = max(1, round(n * val)), max(1, round(n * test))
    if n - n_val - n_test < 1:
        raise ValueError(f"{n} samples are too few for a train/val/test split")
    order = np.random.default_rng([seed, 7]).permutation(n).tolist()
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test : n_test + n_val]),
        "train": sorted(order[n_test + n_val :]),
    }


def part_split(
    train_part: int, test_part: int, limit: int | None, val: float, seed: int
) -> dict[str, list[int]]:
    """Splits of a data set published as a train part and a test part (its samples: the train
    part's, then the test part's): ``test`` is the test part, ``val`` a seeded random ``val``
    fraction of the train part, ``train`` the rest. With ``limit``, at most that many samples
    in all, drawn (seeded) from both parts in their ratio."""
    total = train_part + test_part
    n_train, n_test = train_part, test_part
    if limit is not None and limit < total:
        n_test = min(test_part, max(1, round(limit * test_part / total)))
        n_train = limit - n_test
    n_val = max(1, round(n_train * val))
    if n_train - n_val < 1 or n_test < 1:
        raise ValueError(
            f"{n_train} + {n_test} samples (train part + test part) are too few for a "
            "train/val/test split"
        )
    rng = np.random.default_rng([seed, 7])
    train = rng.permutation(train_part)[:n_train]
    test = np.sort(rng.permutation(test_part)[:n_test]) + train_part
    return {
        "test": test.tolist(),
        "val": sorted(train[:n_val].tolist()),
        "train": sorted(train[n_val:].tolist()),
    }


FullSet = (
    SyntheticDataset
    | ImageFolderDataset
    | SegmentationFolderDataset
    | TorchvisionDataset
    | CocoDetectionDataset
)


def _open_torchvision(params: Params, root: Path) -> TorchvisionDataset:
    """The torchvision data set ``data.dataset`` under ``root``; a missing one is an error that
    says how this project gets it."""
    d = params.data
    if d.dataset is None:  # DataParams refuses torchvision-cls without a data set
        raise ValueError("data.dataset: required for data.task 'torchvision-cls'")
    t0 = time.perf_counter()
    try:
        dataset = TorchvisionDataset(d.dataset, root, download=d.download)
    except DataLayoutError as err:
        fix = "set data.download: true (torchvision fetches it into data.root; needs a network)"
        if d.dataset == "FashionMNIST":
            fix = (
                "`make fashion-mnist` links Debian's files (apt-get install "
                "dataset-fashion-mnist) into data/external/FashionMNIST/raw/, then set "
                f"data.root: data/external; or {fix}"
            )
        raise DataLayoutError(
            f"data.root: {err}\nIn this project: {fix}",
            None,
        ) from None
    print(f"prepare: opened {d.dataset} in {root} in {time.perf_counter() - t0:.1f}s", flush=True)
    return dataset


def _index(params: Params, work: Path) -> tuple[FullSet, Path, Task]:
    """Build (or generate, then open) the full data set. Returns (dataset, root, kind)."""
    d = params.data
    if d.task in GENERATED:
        root = work / "dataset"
        if d.num_samples is None:  # DataParams refuses a generated task without a count
            raise ValueError(f"data.num_samples: required for data.task {d.task!r}")
        t0 = time.perf_counter()
        manifest = generate(d.task, root, d.num_samples, d.image_size, params.seed, **d.generator)
        print(
            f"prepare: generated {len(manifest['samples'])} {d.task} samples "
            f"in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        kind: Task = manifest["kind"]
        return (CocoDetectionDataset if kind == "det" else SyntheticDataset)(root), root, kind
    if d.root is None:  # DataParams refuses a folder-* task without a root
        raise ValueError(f"data.root: required for data.task {d.task!r}")
    root = data_path(d.root)  # a local folder, or s3:// / gs:// (folder tasks)
    if d.task == "torchvision-cls":
        return _open_torchvision(params, root), root, "cls"
    if d.task == "folder-cls":
        return ImageFolderDataset(root), root, "cls"
    if d.task == "folder-det":
        return CocoDetectionDataset(root), root, "det"
    return SegmentationFolderDataset(root, num_classes=d.num_classes), root, "seg"


def _class_names(dataset: Any, kind: str) -> list[str]:
    names = getattr(dataset, "classes", None)
    return list(names) if names else [str(k) for k in range(dataset.num_classes)]


def _load_target(dataset: Any, i: int) -> np.ndarray | int | dict[str, np.ndarray]:
    target = dataset.samples[i][1]
    if dataset.task == "seg":
        with open_file(target) as m:
            return np.asarray(m)
    if dataset.task == "det":
        return {"boxes": target.boxes, "labels": target.labels}
    return int(target)


def class_balance(dataset: Any, indices: list[int]) -> list[float]:
    """Fraction of samples (classification), of pixels (segmentation) or of boxes (detection)
    in each class."""
    counts = np.zeros(dataset.num_classes, np.int64)
    for i in indices:
        target = _load_target(dataset, i)
        if isinstance(target, dict):
            target = target["labels"]
        if isinstance(target, np.ndarray):
            valid = target[target < dataset.num_classes]
            counts += np.bincount(valid.ravel(), minlength=dataset.num_classes)
        else:
            counts[target] += 1
    return (counts / max(1, counts.sum())).tolist()


def _image_sizes(dataset: FullSet) -> Counter[str]:
    """How many images have each ``WxH`` (as shown, after EXIF orientation)."""
    sizes: Counter[str] = Counter()
    for path, _ in dataset.samples:
        with open_file(path) as im:
            width, height = oriented_size(im)
        sizes[f"{width}x{height}"] += 1
    return sizes


def scan_torchvision(dataset: TorchvisionDataset, indices: list[int]) -> tuple[Counter[str], str]:
    """How many of the samples ``indices`` have each image ``WxH``, and a SHA-256 of their
    pixels and labels (in ``splits.json``, so that the data fingerprint changes with the data
    set's content, not only with its name)."""
    sizes: Counter[str] = Counter()
    digest = hashlib.sha256()
    for i in indices:
        image = dataset.image(i)
        sizes[f"{image.width}x{image.height}"] += 1
        digest.update(
            f"{image.mode} {image.width}x{image.height} {dataset.samples[i][1]};".encode()
        )
        digest.update(image.tobytes())
    return sizes, digest.hexdigest()


def _rgb(dataset: FullSet, i: int) -> np.ndarray:
    """Sample ``i``'s image as an RGB array (for the samples grid)."""
    if isinstance(dataset, TorchvisionDataset):
        return np.asarray(to_mode(dataset.image(i), "RGB"))
    return np.asarray(open_image(dataset.samples[i][0], "RGB"))


def _grid(dataset: Any, indices: list[int], names: list[str], count: int, path: Path) -> None:
    chosen = indices[:count]
    images = [_rgb(dataset, i) for i in chosen]
    targets = [_load_target(dataset, i) for i in chosen]
    sample_grid(images, targets, names, path, title="train samples with their labels")


def _write_balance_csv(path: Path, names: list[str], balance: dict[str, list[float]]) -> None:
    rows = [
        {"split": split, "class": name, "fraction": f"{f:.6f}"}
        for split, fractions in balance.items()
        for name, f in zip(names, fractions, strict=True)
    ]
    write_csv(path, rows, ["split", "class", "fraction"])


def _split_torchvision(
    params: Params, dataset: TorchvisionDataset
) -> tuple[dict[str, list[int]], Counter[str], dict[str, Any]]:
    """Split a torchvision data set by its parts (:func:`part_split`) and read the images used.
    Returns (splits, image sizes, the data set's description for ``splits.json``)."""
    d, t0 = params.data, time.perf_counter()
    parts = {part: dataset.part_size(part) for part in ("train", "test")}
    splits = part_split(parts["train"], parts["test"], d.num_samples, d.val_fraction, params.seed)
    used = sorted(i for s in SPLITS for i in splits[s])
    sizes, content = scan_torchvision(dataset, used)
    print(
        f"prepare: {dataset.name}: {len(used)} of {len(dataset)} images (train part "
        f"{parts['train']}, test part {parts['test']}; data.num_samples: {d.num_samples}) "
        f"read in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    side = max(int(v) for v in next(iter(sizes)).split("x")) if len(sizes) == 1 else None
    source = {
        "dataset": dataset.name,
        "parts": parts,
        "image_size": side,
        "content_sha256": content,
    }
    return splits, sizes, source


def write_splits(
    work: Path,
    params: Params,
    dataset: FullSet,
    root: Path,
    kind: Task,
    names: list[str],
    splits: dict[str, list[int]],
    source: dict[str, Any] | None = None,
) -> None:
    """``splits.json`` in the staging folder ``work``: the task, its classes, where the images
    live (relative to the prepared folder when generated into it), each split's image paths
    relative to that root (a torchvision data set's keys), and ``source``'s entries (a
    torchvision data set's name, image size and content hash); for detection also each
    label's COCO category id and each split's COCO file (:func:`pipelines.data.coco_file`)."""

    def rel(i: int) -> str:
        return sample_name(dataset.samples[i][0], root)

    in_work = isinstance(root, Path) and root.is_relative_to(work)
    if isinstance(dataset, CocoDetectionDataset):
        source = {**(source or {}), "category_ids": dataset.category_ids}
        for s in SPLITS:
            images = [dataset.samples[i][1] for i in splits[s]]
            write_json(coco_file(work, s), coco_dict(images, dataset.category_ids, names))
    write_json(
        work / SPLITS_JSON,
        {
            "task": params.data.task,
            "kind": kind,
            "classes": names,
            "root": root.relative_to(work).as_posix() if in_work else str(root),
            "large": "large" if (work / "large").is_dir() else None,
            **(source or {}),
            **{s: [rel(i) for i in splits[s]] for s in SPLITS},
        },
    )


def prepare(
    params: Params, out_dir: Path = PREPARED, reports_dir: Path = PREPARE_REPORTS
) -> dict[str, Any]:
    """Run the stage; returns the report (also written to ``reports_dir``)."""
    d = params.data
    out_dir, reports_dir = Path(out_dir), Path(reports_dir)
    work = staging_dir(out_dir)

    dataset, root, kind = _index(params, work)
    names = _class_names(dataset, kind)
    source: dict[str, Any] | None = None  # a torchvision data set's description
    if isinstance(dataset, TorchvisionDataset):
        splits, sizes, source = _split_torchvision(params, dataset)
    else:
        splits = split_indices(len(dataset), d.val_fraction, d.test_fraction, params.seed)
        sizes = _image_sizes(dataset)
    if d.task in GENERATED and d.large.num_samples:
        generate(
            d.task,
            work / "large",
            d.large.num_samples,
            d.large.image_size,
            params.seed + 1,
            **d.generator,
        )

    write_splits(work, params, dataset, root, kind, names, splits, source)

    balance = {s: class_balance(dataset, splits[s]) for s in SPLITS}
    reports_dir.mkdir(parents=True, exist_ok=True)
    _grid(dataset, splits["train"], names, d.grid_samples, reports_dir / "samples.png")
    _write_balance_csv(reports_dir / "class_balance.csv", names, balance)
    metrics = {
        "num_samples": sum(len(splits[s]) for s in SPLITS),
        "num_skipped": len(dataset.skipped),
        "num_classes": len(names),
        **{f"num_{s}": len(splits[s]) for s in SPLITS},
        "num_large": d.large.num_samples if (work / "large").is_dir() else 0,
    }
    if isinstance(dataset, CocoDetectionDataset):
        metrics["num_boxes"] = sum(
            len(dataset.samples[i][1].labels) for s in SPLITS for i in splits[s]
        )
        metrics["num_crowd_dropped"] = dataset.num_crowd
    report: dict[str, Any] = {
        "metrics": metrics,
        "classes": names,
        "class_balance": balance,
        "image_sizes": dict(sizes),
        "skipped": [{"path": p, "reason": r} for p, r in dataset.skipped],
    }
    if source:
        report["source"] = {**source, "root": str(root)}
    write_json(reports_dir / "report.json", report)
    write_json(reports_dir / "metrics.json", metrics)

    publish_dir(work, out_dir)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("--out", type=Path, default=PREPARED, help="data folder to write")
    parser.add_argument(
        "--reports", type=Path, default=PREPARE_REPORTS, help="report folder to write"
    )


def run(args: argparse.Namespace) -> int:
    from pipelines import tracking

    params = load_params(args.params, args.overrides)
    with tracking.stage_run(
        "prepare", params.model_dump(include={"seed", "data"}), params.tracking.experiment
    ):
        import mlflow

        report = prepare(params, args.out, args.reports)
        mlflow.log_metrics({k: float(v) for k, v in report["metrics"].items()})
        mlflow.log_artifacts(str(args.reports), artifact_path="prepare")
    print(f"prepare: {json.dumps(report['metrics'])}")
    return 0
