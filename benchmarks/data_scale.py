"""Is every stage's memory flat in the data set's size, and does the loader keep the model fed?

Usage: ``python benchmarks/data_scale.py [--sizes 1000 10000 50000] [--work DIR] [--workers 2]``

For each size, a ``folder-cls`` data set of that many 256 px JPEG photos (4 classes; a random
ellipse on a gradient) is written once under ``--work`` (kept for reruns; its disk use is
reported) and prepared by the ``prepare`` stage. Then, each in a fresh process so that its
peak RSS (``ru_maxrss``) is its own:

- ``tune driver``: what the stage holds before the sweep (:func:`data_context`: where the
  data are, the class weights from one streamed pass) and the validation size it reports;
- ``tune trial``: one trial of the pipeline's local baseline point (params.yaml's first
  ``tune.points_to_evaluate``) over the whole training split for one epoch, reading its own
  batches; its training images/s is the model's (:func:`train_epoch` times the steps only).
  Right after it, in the same process (the machine's load then the same for both), the
  loader's images/s: the trial's stream (decode 256 px, resize to the held size) of the first
  1024 training images, with 0 (in the trial's process) and ``--workers`` loader processes;
- ``pretrain worker``: one epoch of the pretrain stage's training in process
  (:func:`train_in_process`, params.yaml's ``pretrain`` section) on the whole split;
- ``finetune worker``: the finetune stage's worker set-up (:meth:`FinetuneHooks.build`: the
  split opened, the class counts streamed) and one epoch of its loader, without the model's
  steps (the reading is what grows with the data).

Writes ``benchmarks/results/data_scale.{json,md}``. The targets (issue 17): peak memory at the
largest size at most 1.5x that at the smallest; loader images/s at least 2x the model's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("a", "b", "c", "d")
SIDE = 256
MEASURES = ("tune driver", "tune trial", "pretrain worker", "finetune worker")


def write_photos(root: Path, n: int, seed: int = 0) -> None:
    """``n`` JPEG photos of ``SIDE`` px in ``len(CLASSES)`` class folders (once: a folder
    that holds its ``.done`` mark is kept)."""
    if (root / ".done").is_file():
        return
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, SIDE, dtype=np.float32)
    for c in CLASSES:
        (root / c).mkdir(parents=True)
    for i in range(n):
        c = i % len(CLASSES)
        base = rng.integers(0, 256, 3) * ramp[:, None, None] + rng.integers(0, 64, 3)
        image = Image.fromarray(np.broadcast_to(base, (SIDE, SIDE, 3)).astype(np.uint8))
        x, y, r = *rng.integers(32, SIDE - 32, 2), 12 + 8 * c
        ImageDraw.Draw(image).ellipse(
            (x - r, y - r, x + r, y + r), fill=tuple(rng.integers(0, 256, 3))
        )
        image.save(root / CLASSES[c] / f"{i:06d}.jpg", quality=90)
    (root / ".done").write_text(f"{n}\n")


def disk_mib(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 2**20


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, prepared: Path, workers: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process."""
    from pipelines.config import load_params
    from pipelines.data import held_split, native_size, stream
    from pipelines.stages.tune import stage, trial

    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml", ["tune.epochs=1", "tune.grace_period=1"])
    p, out = params.tune, {}
    t0 = time.perf_counter()
    if kind == "tune driver":
        context = stage.data_context(prepared, None, p, params.seed)
        out["val_images"] = len(context.val.open())
    elif kind == "tune trial":
        context = stage.data_context(prepared, None, p, params.seed)
        row = trial.run_trial(p.points("cls")[0], context, lambda r: None)
        assert row["status"] == "ok", row.get("traceback")
        out["model_images_per_s"] = row["images_per_s"]
        out["skipped"] = row["skipped"]
        held = held_split(prepared, "train", 1024, native_size(prepared, max(p.img_sizes)))
        data = held.open()  # indexing the folder is not reading: outside the timing
        for w in (0, workers):
            start = time.perf_counter()
            n = sum(len(b[0]) for b in stream(data, 32, workers=w))
            out[f"loader_images_per_s_{w}w"] = n / (time.perf_counter() - start)
    elif kind == "pretrain worker":
        from pipelines.stages.pretrain import train_in_process, train_split, train_view

        q = params.pretrain.model_copy(update={"epochs": 1, "warmup_epochs": 0.5})
        train_in_process(q, train_split(q, prepared, train_view(q)), params.seed)
    else:  # finetune worker
        out.update(_finetune_epoch(params, prepared))
    return {**out, "seconds": time.perf_counter() - t0, "peak_rss_mib": _rss_mib()}


def _finetune_epoch(params: Any, prepared: Path) -> dict[str, Any]:
    from pipelines.data import read_splits
    from pipelines.stages.finetune import FinetuneHooks
    from pipelines.stages.tune.space import model_config
    from pipelines.train.trainer import worker_loader

    p, info = params.tune, read_splits(prepared)
    point = p.points("cls")[0]
    size = int(point["img_size"])
    config = {
        "params": params.finetune.model_dump(mode="json"),
        "lr": point["lr"],
        "task": "cls",
        "num_classes": len(info["classes"]),
        "model": model_config(point, p, "cls", len(info["classes"]), 3),
        "init": "scratch",
        "prepared": str(prepared),
        "img_size": size,
        "batch_size": int(point["batch_size"]),
        "seed": params.seed,
    }
    hooks = FinetuneHooks(config)
    _, dataset, batch_size = hooks.build()
    loader, _ = worker_loader(dataset, batch_size, 1)
    return {"images_read": sum(len(b[0]) for b in loader)}


def photo_set(n: int, work: Path) -> tuple[Path, Path, float]:
    """The data set of ``n`` photos under ``work``, written and prepared once: its photos'
    folder, its prepared folder, and the seconds the writing took (next to none when kept)."""
    from pipelines.config import load_params
    from pipelines.stages.prepare import prepare

    photos, prepared = work / f"photos_{n}", work / f"prepared_{n}"
    t0 = time.perf_counter()
    write_photos(photos, n)
    written = time.perf_counter() - t0
    if not (prepared / "splits.json").is_file():
        overrides = ["data.task=folder-cls", f"data.root={photos}", "data.grid_samples=4"]
        prepare(load_params(ROOT / "params.yaml", overrides), prepared, work / f"reports_{n}")
    return photos, prepared, written


def run_size(n: int, work: Path, workers: int) -> list[dict[str, Any]]:
    """Write, prepare and measure the data set of ``n`` photos."""
    photos, prepared, written = photo_set(n, work)
    base = {"images": n, "disk_mib": disk_mib(photos), "write_s": written}
    rows = []
    for kind in MEASURES:
        cmd = [sys.executable, __file__, "--measure", kind, "--prepared", str(prepared)]
        cmd += ["--workers", str(workers)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SystemExit(f"{kind} at {n} images failed:\n{done.stderr[-4000:]}")
        rows.append({**base, "measure": kind, **json.loads(done.stdout.splitlines()[-1])})
        print(f"[data_scale] {n} images, {kind}: {rows[-1]}", flush=True)
    return rows


def summarise(rows: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Peak RSS at the largest size over the smallest, per measure; the loader's images/s
    over the model's, measured in the same trial process (the lowest over the sizes)."""
    sizes = sorted({r["images"] for r in rows})
    rss = {(r["images"], r["measure"]): r["peak_rss_mib"] for r in rows}
    growth = {k: rss[(sizes[-1], k)] / rss[(sizes[0], k)] for k in MEASURES}
    trials = [r for r in rows if r["measure"] == "tune trial"]
    speed = {
        w: min(r[f"loader_images_per_s_{w}w"] / r["model_images_per_s"] for r in trials)
        for w in (0, workers)
    }
    return {
        "sizes": sizes,
        "peak_rss_growth": growth,
        "memory_target_met": max(growth.values()) <= 1.5,
        **{f"loader_over_model_{w}w": v for w, v in speed.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--work", type=Path, default=Path("/tmp/gattn_data_scale"))
    ap.add_argument("--workers", type=int, default=2, help="loader processes to compare")
    ap.add_argument("--out", default="data_scale")
    ap.add_argument("--measure", choices=MEASURES, help=argparse.SUPPRESS)
    ap.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # a child: one measurement, one JSON line
        print(json.dumps(measure(args.measure, args.prepared, args.workers)))
        return
    rows = [r for n in args.sizes for r in run_size(n, args.work, args.workers)]
    summary = summarise(rows, args.workers)
    columns = ["images", "disk_mib", "measure", "peak_rss_mib", "seconds"]
    columns += [
        "model_images_per_s",
        "loader_images_per_s_0w",
        f"loader_images_per_s_{args.workers}w",
    ]
    meta = {**environment(torch.device("cpu")), "work": str(args.work), **summary}
    notes = (
        "Peak RSS of each measure's own process (ru_maxrss; loader workers are processes of "
        "their own). model images/s: the tune trial's timed training steps at the baseline "
        "point (batch 8, 64 px, 1 thread); loader images/s: 256 px JPEGs decoded and resized "
        "to the held size, batches of 32.\n"
    )
    write_results(args.out, rows, columns, meta, notes)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
