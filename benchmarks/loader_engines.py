"""Ray Data or the torch ``DataLoader`` for the stages' input pipeline? Both on the same JPEGs.

Usage: ``python benchmarks/loader_engines.py [--sizes 1000 10000] [--dataset 50000]
[--work DIR] [--workers 2]``

The images: the first ``n`` training images of ``data_scale.py``'s generated data set of
``--dataset`` 256 px JPEG photos (under ``--work``, shared with it; written and prepared once),
each decoded, resized to the tune stage's held size (64 px at params.yaml's sizes), made
float and batched by 32 with its label. Each engine in a fresh process:

- ``DataLoader``: the trials' own stream (:func:`pipelines.data.stream` over
  :func:`held_split`: a JPEG decoded at the smallest of its reduced scales still at least the
  held size, then resized) with 0 and ``--workers`` loader processes; and with ``--workers``
  processes decoding each JPEG whole, as Ray Data does (``full decode``);
- ``Ray Data``: ``ray.data.read_images`` over the same files (with their paths, for the
  labels), resized in ``map_batches`` (torch's antialiased bilinear resize, as torchvision's
  ``Resize``), read with ``iter_torch_batches``, on the pipeline's local Ray
  (:func:`local_ray` with ``--workers`` CPUs: its read and map tasks use them all).

images/s: the whole pass, from the first batch asked for to the last received (loader
workers' and Ray tasks' start included; Ray's own start outside), and after the first batch
(the steady rate; the first batch's wait is reported apart). Memory: the peak RSS of the
process that reads the batches (``ru_maxrss``), and the peak PSS of it with every process it
started (loader workers; Ray's GCS, raylet, workers and object store), sampled every 0.2 s,
over its value before the pass (Ray's idle processes are its baseline: a trial already runs
in Ray). Writes ``benchmarks/results/loader_engines.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402
from data_scale import photo_set  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BATCH = 32
ENGINES = ("DataLoader 0w", "DataLoader {w}w", "DataLoader {w}w full decode", "Ray Data")


class TreePss:
    """The peak summed PSS (MiB) of this process and its descendants, sampled in a thread."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak = every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def now(self) -> float:
        me = psutil.Process()
        total = 0
        for proc in (me, *me.children(recursive=True)):
            with contextlib.suppress(psutil.Error):  # ended between listing and reading
                total += proc.memory_full_info().pss
        return total / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> TreePss:
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def loader_batches(prepared: Path, n: int, size: int, workers: int, draft: bool) -> Iterable[Any]:
    """The trials' stream of the first ``n`` training images; ``draft=False``: each JPEG
    decoded whole before the resize."""
    from pipelines.data import SkipCounted, held_split, held_transform, open_split, stream, subset

    held = held_split(prepared, "train", n, size)
    if draft:
        data = held.open()
    else:
        split = open_split("train", prepared, held_transform(held.kind, size))
        data = SkipCounted(subset(split, n))
    return stream(data, BATCH, workers=workers)


def resized(batch: dict[str, np.ndarray], size: int, classes: list[str]) -> dict[str, np.ndarray]:
    """A Ray Data batch of decoded images (``image``: N x H x W x 3 uint8, ``path``) as the
    trials hold it: N x 3 x ``size`` x ``size`` floats in [0, 1], and the labels."""
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float().div_(255)
    images = torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    labels = [classes.index(Path(p).parent.name) for p in batch["path"]]
    return {"image": images.numpy(), "label": np.asarray(labels, dtype=np.int64)}


def ray_data_batches(prepared: Path, n: int, size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Ray Data's pass over the same files, in batches of :data:`BATCH`."""
    import ray.data

    from pipelines.data import images_root, read_splits

    info = read_splits(prepared)
    root = images_root(prepared, info)
    files = [str(root / name) for name in info["train"][:n]]
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.read_images(files, include_paths=True, mode="RGB")
    ds = ds.map_batches(partial(resized, size=size, classes=info["classes"]), batch_format="numpy")
    return iter(ds.iter_torch_batches(batch_size=BATCH))


def measure(engine: str, prepared: Path, n: int, workers: int) -> dict[str, Any]:
    """One engine's pass, in this (fresh) process."""
    from pipelines.config import load_params
    from pipelines.data import native_size
    from pipelines.ray_session import local_ray

    torch.set_num_threads(1)
    size = native_size(prepared, max(load_params(ROOT / "params.yaml").tune.img_sizes))
    ray_up = local_ray(workers) if engine == "Ray Data" else contextlib.nullcontext()
    with ray_up:
        if engine == "Ray Data":
            batches: Iterable[Any] = ray_data_batches(prepared, n, size)
        else:
            w = 0 if engine == "DataLoader 0w" else workers
            batches = loader_batches(prepared, n, size, w, draft="full" not in engine)
        read, first = 0, 0.0
        with TreePss() as pss:
            before = pss.peak
            t0 = time.perf_counter()
            for batch in batches:
                images = batch["image"] if isinstance(batch, dict) else batch[0]
                assert images.shape[1:] == (3, size, size), images.shape
                read += len(images)
                first = first or time.perf_counter() - t0
            seconds = time.perf_counter() - t0
    assert read == n, (read, n)
    return {
        "held_px": size,
        "images_per_s": n / seconds,
        "images_per_s_after_first": (n - BATCH) / (seconds - first),
        "first_batch_s": first,
        "seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tree_pss_before_mib": before,
        "tree_pss_peak_mib": pss.peak,
        "tree_pss_growth_mib": pss.peak - before,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--dataset", type=int, default=50000, help="data_scale.py's set to read")
    ap.add_argument("--work", type=Path, default=Path("/tmp/gattn_data_scale"))
    ap.add_argument("--workers", type=int, default=2, help="loader processes / Ray CPUs")
    ap.add_argument("--out", default="loader_engines")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # a child: one measurement, one JSON line
        (n,) = args.sizes
        print(json.dumps(measure(args.measure, args.prepared, n, args.workers)))
        return
    _, prepared, _ = photo_set(args.dataset, args.work)
    rows = []
    for n in args.sizes:
        for engine in (e.format(w=args.workers) for e in ENGINES):
            cmd = [sys.executable, __file__, "--measure", engine, "--sizes", str(n)]
            cmd += ["--prepared", str(prepared), "--workers", str(args.workers)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"{engine} at {n} images failed:\n{done.stderr[-4000:]}")
            rows.append({"images": n, "engine": engine, **json.loads(done.stdout.splitlines()[-1])})
            print(f"[loader_engines] {rows[-1]}", flush=True)
    columns = ["images", "engine", "images_per_s", "images_per_s_after_first", "first_batch_s"]
    columns += ["seconds", "peak_rss_mib"]
    columns += ["tree_pss_before_mib", "tree_pss_peak_mib", "tree_pss_growth_mib"]
    meta = {**environment(torch.device("cpu")), "work": str(args.work), "dataset": args.dataset}
    notes = (
        f"The first n training images of {args.dataset} generated 256 px JPEGs, resized to "
        f"{rows[0]['held_px']} px, batches of {BATCH}, 1 torch thread per process. peak_rss: "
        "the process reading the batches (ru_maxrss); tree_pss: it and every process it "
        "started (loader workers; Ray's GCS, raylet, workers, object store), before the pass "
        "and at its peak (sampled every 0.2 s).\n"
    )
    write_results(args.out, rows, columns, meta, notes)


if __name__ == "__main__":
    main()
