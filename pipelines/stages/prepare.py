"""``prepare`` stage: generate or index the data set, split it, report on it.

Reads ``seed``, ``tracking`` and ``data`` from params.yaml. Writes

- ``data/prepared/``: ``dataset/`` (the generated benchmark, when ``data.task`` is one),
  ``large/`` (large generated test images for sliding-window evaluation), ``splits.json``
  (train/val/test image paths, classes, where the images live);
- ``reports/prepare/``: ``metrics.json`` (``dvc metrics``), ``class_balance.csv`` and
  ``samples.png`` (``dvc plots``), ``report.json`` (skipped files, sizes).

Everything is built in a temporary folder and moved into place at the end, so an interrupted
run never leaves a half-written ``data/prepared`` that looks complete.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gattn.data import (
    ImageFolderDataset,
    SegmentationFolderDataset,
    SyntheticDataset,
    generate,
    open_image,
    oriented_size,
)
from gattn.diagnostics import sample_grid
from pipelines.config import Params, Task, add_params_arguments, load_params
from pipelines.data import GENERATED, SPLITS
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


FullSet = SyntheticDataset | ImageFolderDataset | SegmentationFolderDataset


def _index(params: Params, work: Path) -> tuple[FullSet, Path, Task]:
    """Build (or generate, then open) the full data set. Returns (dataset, root, kind)."""
    d = params.data
    if d.task in GENERATED:
        root = work / "dataset"
        t0 = time.perf_counter()
        manifest = generate(d.task, root, d.num_samples, d.image_size, params.seed, **d.generator)
        print(
            f"prepare: generated {len(manifest['samples'])} {d.task} samples "
            f"in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        return SyntheticDataset(root), root, manifest["kind"]
    if d.root is None:  # DataParams refuses a folder-* task without a root
        raise ValueError(f"data.root: required for data.task {d.task!r}")
    root = Path(d.root).resolve()
    if d.task == "folder-cls":
        return ImageFolderDataset(root), root, "cls"
    return SegmentationFolderDataset(root, num_classes=d.num_classes), root, "seg"


def _class_names(dataset: Any, kind: str) -> list[str]:
    names = getattr(dataset, "classes", None)
    return list(names) if names else [str(k) for k in range(dataset.num_classes)]


def _load_target(dataset: Any, i: int) -> np.ndarray | int:
    target = dataset.samples[i][1]
    if dataset.task == "seg":
        with Image.open(target) as m:
            return np.asarray(m)
    return int(target)


def class_balance(dataset: Any, indices: list[int]) -> list[float]:
    """Fraction of samples (classification) or of pixels (segmentation) in each class."""
    counts = np.zeros(dataset.num_classes, np.int64)
    for i in indices:
        target = _load_target(dataset, i)
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
        with Image.open(path) as im:
            width, height = oriented_size(im)
        sizes[f"{width}x{height}"] += 1
    return sizes


def _grid(dataset: Any, indices: list[int], names: list[str], count: int, path: Path) -> None:
    chosen = indices[:count]
    images = []
    for i in chosen:
        images.append(np.asarray(open_image(dataset.samples[i][0], "RGB")))
    targets = [_load_target(dataset, i) for i in chosen]
    sample_grid(images, targets, names, path, title="train samples with their labels")


def _write_balance_csv(path: Path, names: list[str], balance: dict[str, list[float]]) -> None:
    rows = [
        {"split": split, "class": name, "fraction": f"{f:.6f}"}
        for split, fractions in balance.items()
        for name, f in zip(names, fractions, strict=True)
    ]
    write_csv(path, rows, ["split", "class", "fraction"])


def write_splits(
    work: Path,
    params: Params,
    dataset: FullSet,
    root: Path,
    kind: Task,
    names: list[str],
    splits: dict[str, list[int]],
) -> None:
    """``splits.json`` in the staging folder ``work``: the task, its classes, where the images
    live (relative to the prepared folder when generated into it) and each split's image
    paths relative to that root."""

    def rel(i: int) -> str:
        return Path(dataset.samples[i][0]).relative_to(root).as_posix()

    in_work = root.is_relative_to(work)
    write_json(
        work / SPLITS_JSON,
        {
            "task": params.data.task,
            "kind": kind,
            "classes": names,
            "root": root.relative_to(work).as_posix() if in_work else str(root),
            "large": "large" if (work / "large").is_dir() else None,
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
    splits = split_indices(len(dataset), d.val_fraction, d.test_fraction, params.seed)
    if d.task in GENERATED and d.large.num_samples:
        generate(
            d.task,
            work / "large",
            d.large.num_samples,
            d.large.image_size,
            params.seed + 1,
            **d.generator,
        )

    write_splits(work, params, dataset, root, kind, names, splits)

    balance = {s: class_balance(dataset, splits[s]) for s in SPLITS}
    reports_dir.mkdir(parents=True, exist_ok=True)
    _grid(dataset, splits["train"], names, d.grid_samples, reports_dir / "samples.png")
    _write_balance_csv(reports_dir / "class_balance.csv", names, balance)
    metrics = {
        "num_samples": len(dataset),
        "num_skipped": len(dataset.skipped),
        "num_classes": len(names),
        **{f"num_{s}": len(splits[s]) for s in SPLITS},
        "num_large": d.large.num_samples if (work / "large").is_dir() else 0,
    }
    report = {
        "metrics": metrics,
        "classes": names,
        "class_balance": balance,
        "image_sizes": dict(_image_sizes(dataset)),
        "skipped": [{"path": p, "reason": r} for p, r in dataset.skipped],
    }
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
