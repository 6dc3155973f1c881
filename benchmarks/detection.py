"""Small-object detection on tiny-det: does the article's recipe (P2 + PPM + large kernel) pay?

Usage: ``python benchmarks/detection.py [--seeds 0 1] [--variants ...] [--steps 400 ...]``

``tiny-det`` (:mod:`gattn.data.tiny_det`: 4-16 px rings among look-alike clutter, each
object's class told only by a distant cue) is generated once into ``--work`` (train and test
from different seeds, the same bytes every time). The defaults: 256 px images, a 32 px cue at
least 0.4 of the side (102 px) from every ring, so that the cue lies outside most of a ring's
neighbourhood while the backbone's theoretical receptive field (about 260 px at P5 + the FPN)
still spans the image; on 128 px images with an 8 px cue (the first sitting's setting,
``--image-size 128 --cue-px 8 --cue-clearance 0.25 --steps 300 --batch-size 16``) every
variant needed over 500 steps to read the cue and P5 covered the whole image.

Every variant is a :func:`build_model` detector (FPN + FCOS head, :mod:`gattn.models.recipes`)
trained with one budget: the same steps, batch, AdamW, warm-up + cosine schedule, random
flips (``det_train_transform``):

- ``p3``: ``gattn_det_p3``, FPN P3-P5, no global block (the local baseline);
- ``p2``: ``gattn_det_p2``, + the stride-4 P2 level;
- ``p2_ppm_lk``: ``gattn_det_p2_ppm_lk``, P2 + PPM + a 13x13 large kernel on the top level
  (the article's recipe);
- ``p2_tokens``: ``gattn_det_p2_tokens``, P2 + 8 global tokens on the top level;
- ``p3_2x``: ``gattn_det_p3`` fed the images upsampled 2x (a resolution-only control: P3 at 2x
  input has the stride-4 detail of P2, and no more context).

Reported on the test images at their own resolution (predictions of the 2x control scaled
back, so COCO's size ranges mean the same): mAP, AP50, AP_small, AP_medium, AP_large
(:func:`gattn.metrics.score_detections`), and the class-agnostic mAP (every box one class,
NMS across classes: how well the rings are found whatever their class; mAP near it means the
cue is read, near a third of it not); training images/s (the whole training loop, data
loading included) and peak memory of one training step (tracked tensor allocations,
:func:`gattn.budget.measure_peak_memory`), also as ratios to ``p3``. Cells: mean (spread = max
- min, n = seeds). The issue's targets are printed and written as True/False lines.

Each (variant, seed) is one piece: its result is written atomically under ``--work`` and a
rerun skips it, so the benchmark runs across sittings; ``--cached-only`` writes the table
from the pieces done so far. Writes ``benchmarks/results/<--out>.{json,md}`` and the README's
``<!-- detection -->`` block. The defaults take about 50 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from torchvision.ops import nms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    _atomic_write,
    environment,
    fill_readme,
    markdown_table,
    write_results,
)

from gattn.budget import measure_peak_memory  # noqa: E402
from gattn.data import CocoDetectionDataset, collate_detection  # noqa: E402
from gattn.data.synthetic import ManifestError, generate, read_manifest  # noqa: E402
from gattn.data.views import det_train_transform, seg_eval_transform  # noqa: E402
from gattn.metrics import score_detections  # noqa: E402
from gattn.models import Detector, build_model  # noqa: E402
from pipelines.train.loop import warmup_cosine_scheduler  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# variant -> (recipe, input side as a multiple of the image side)
VARIANTS: dict[str, tuple[str, int]] = {
    "p3": ("gattn_det_p3", 1),
    "p2": ("gattn_det_p2", 1),
    "p2_ppm_lk": ("gattn_det_p2_ppm_lk", 1),
    "p2_tokens": ("gattn_det_p2_tokens", 1),
    "p3_2x": ("gattn_det_p3", 2),
}
BASELINE = "p3"
FAR_BELOW = 0.5  # "the local baseline far below": its mAP at most this share of the recipe's
METRICS = ("map", "map_50", "map_small", "map_medium", "map_large", "map_agnostic")
COLUMNS = [
    "variant",
    "recipe",
    "input_px",
    "map",
    "map_50",
    "map_small",
    "map_medium",
    "map_large",
    "map_agnostic",
    "train_img_s",
    "img_s_vs_p3",
    "peak_mib",
    "peak_vs_p3",
    "params",
]


def prepare_data(
    work: Path, n_train: int, n_test: int, image_size: int, seed: int, **generator: Any
) -> None:
    """Generate tiny-det's train and test sets under ``work`` unless they are there already
    (a manifest with the same settings); ``generator``: :class:`TinyDetConfig` fields."""
    for split, n, s in (("train", n_train, seed), ("test", n_test, seed + 1)):
        root = work / split
        try:
            m = read_manifest(root)
            same = all(m["config"].get(k) == v for k, v in generator.items())
            if (m["n"], m["image_size"], m["seed"]) == (n, image_size, s) and same:
                continue
        except ManifestError:
            pass
        t0 = time.perf_counter()
        generate("tiny-det", root, n, image_size=image_size, seed=s, **generator)
        print(f"[detection] tiny-det {split}: {n} images at {image_size} px, seed {s}, "
              f"{time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip


def train(
    model: Detector,
    data: CocoDetectionDataset,
    args: argparse.Namespace,
    seed: int,
    label: str,
) -> float:
    """Train ``model`` for ``args.steps`` steps of ``args.batch_size`` (AdamW, warm-up +
    cosine, gradients clipped to norm 1); return the wall time in seconds."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(
        data, args.batch_size, shuffle=True, drop_last=True, collate_fn=collate_detection,
        generator=gen,
    )  # fmt: skip
    per_epoch = len(loader)
    epochs = math.ceil(args.steps / per_epoch)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = warmup_cosine_scheduler(opt, args.steps, args.warmup * args.steps, 0.01)
    model.train()
    step, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        losses = []
        for images, targets in loader:
            loss = model.loss(model(images), targets)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            if step == args.steps:
                break
        rate = step * args.batch_size / (time.perf_counter() - t0)
        print(f"[detection] {label}: epoch {epoch + 1}/{epochs} step {step}/{args.steps} "
              f"loss {statistics.fmean(losses):.3f} ({rate:.1f} img/s)", flush=True)  # fmt: skip
    return time.perf_counter() - t0


@torch.no_grad()
def evaluate(
    model: Detector, root: Path, input_px: int, image_px: int, num_classes: int
) -> dict[str, Any]:
    """COCO box AP on the images under ``root``, predictions at ``input_px`` scaled back to
    the images' own ``image_px``."""
    data = CocoDetectionDataset(root, transform=seg_eval_transform(input_px))
    targets = CocoDetectionDataset(root)  # boxes in the images' own pixels
    scale = image_px / input_px
    model.eval()
    preds = []
    for images, _ in DataLoader(data, 32, collate_fn=collate_detection):
        for p in model.predict(images, score_thresh=0.05, nms_iou=0.6, max_det=100):
            preds.append({**p, "boxes": p["boxes"] * scale})
    truth = [targets[i][1] for i in range(len(targets))]
    scores = score_detections(preds, truth, num_classes)
    # Class-agnostic: every box one class (NMS over all of an image's boxes), so that "where"
    # is scored apart from "which": mAP near it means the cue is read, near a third not.
    anyclass = []
    for p in preds:
        keep = nms(p["boxes"], p["scores"], 0.6)
        anyclass.append({"boxes": p["boxes"][keep], "scores": p["scores"][keep],
                         "labels": torch.zeros_like(p["labels"][keep])})  # fmt: skip
    one = [{**t, "labels": torch.zeros_like(t["labels"])} for t in truth]
    return {**scores, "map_agnostic": score_detections(anyclass, one, 1)["map"]}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a piece's result depends on besides its variant and seed."""
    keys = ("image_size", "cue_clearance", "cue_px", "train_images", "test_images", "data_seed",
            "steps", "batch_size", "lr", "weight_decay", "warmup", "threads")  # fmt: skip
    return {k: getattr(args, k) for k in keys}


def run_piece(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and score one (variant, seed), or read its cached result back (None with
    ``--cached-only`` when it has not run)."""
    what = settings(args)
    key = json.dumps({"variant": name, "seed": seed, **what}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    done = args.work / "pieces" / f"{name}-s{seed}-{digest}.json"
    if done.is_file():
        return json.loads(done.read_text())
    if args.cached_only:
        return None
    recipe, factor = VARIANTS[name]
    input_px = factor * args.image_size
    num_classes = read_manifest(args.work / "train")["num_classes"]
    cfg = {"task": "det", "recipe": recipe, "num_classes": num_classes, "img_size": input_px}
    torch.manual_seed(seed)
    model = build_model(cfg)
    assert isinstance(model, Detector)
    data = CocoDetectionDataset(args.work / "train", transform=det_train_transform(input_px))
    train_s = train(model, data, args, seed, f"{name} seed {seed}")
    scores = evaluate(model, args.work / "test", input_px, args.image_size, num_classes)
    peak = measure_peak_memory(cfg, args.batch_size, input_px, seed=seed)
    result = {
        "variant": name,
        "seed": seed,
        "recipe": recipe,
        "input_px": input_px,
        "params": sum(p.numel() for p in model.parameters()),
        "train_s": train_s,
        "train_img_s": args.steps * args.batch_size / train_s,
        "peak_mib": peak / 2**20,
        **{k: scores[k] for k in METRICS},
        "settings": what,
    }
    weights = done.with_suffix(".safetensors")  # to score the piece again without training
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    _atomic_write(done, json.dumps(result, indent=1) + "\n")
    print(f"[detection] {name} seed {seed}: mAP {result['map']:.3f} AP_small "
          f"{result['map_small']:.3f} in {train_s:.0f}s", flush=True)  # fmt: skip
    return result


def cell(values: Sequence[float]) -> str:
    """``mean (spread, n=k)``; ``nan`` when a figure has nothing to measure."""
    if any(math.isnan(v) for v in values):
        return "nan"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ({max(values) - min(values):.3f}, n={len(values)})"


def summarise(pieces: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per variant: its figures over seeds, speed and memory also as ratios to p3."""
    base = pieces.get(BASELINE, [])
    rows = []
    for name, rs in pieces.items():
        row: dict[str, Any] = {"variant": name}
        row |= {k: rs[0][k] for k in ("recipe", "input_px", "params")}
        row |= {k: cell([r[k] for r in rs]) for k in METRICS}
        for key, ratio in (("train_img_s", "img_s_vs_p3"), ("peak_mib", "peak_vs_p3")):
            mean = statistics.fmean(r[key] for r in rs)
            row[key] = f"{mean:.1f}" if key == "train_img_s" else f"{mean:.0f}"
            row[ratio] = f"{mean / statistics.fmean(r[key] for r in base):.2f}x" if base else None
        rows.append(row)
    return rows


def check_targets(pieces: dict[str, list[dict[str, Any]]]) -> dict[str, bool]:
    """The issue's targets, each on every seed the variants share."""

    def by_seed(name: str) -> dict[int, dict[str, Any]]:
        return {r["seed"]: r for r in pieces.get(name, [])}

    def every(a: str, b: str, holds: Any) -> bool | None:
        ra, rb = by_seed(a), by_seed(b)
        seeds = sorted(set(ra) & set(rb))
        return all(holds(ra[s], rb[s]) for s in seeds) if seeds else None

    found = {
        "p2: AP_small above p3 on every seed": every(
            "p2", "p3", lambda a, b: a["map_small"] > b["map_small"]
        ),
        "p2_ppm_lk: AP_small above p2 on every seed": every(
            "p2_ppm_lk", "p2", lambda a, b: a["map_small"] > b["map_small"]
        ),
        f"p3: mAP at most {FAR_BELOW} x p2_ppm_lk's on every seed": every(
            "p3", "p2_ppm_lk", lambda a, b: a["map"] <= FAR_BELOW * b["map"]
        ),
    }
    return {k: v for k, v in found.items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--image-size", type=int, default=256, help="tiny-det image side, px")
    ap.add_argument(
        "--cue-clearance", type=float, default=0.4,
        help="least cue-to-object distance, share of the image side (TinyDetConfig)",
    )  # fmt: skip
    ap.add_argument("--cue-px", type=int, default=32, help="cue square side, px (TinyDetConfig)")
    ap.add_argument("--train-images", type=int, default=800)
    ap.add_argument("--test-images", type=int, default=200)
    ap.add_argument("--data-seed", type=int, default=0, help="train set seed (test: + 1)")
    ap.add_argument("--steps", type=int, default=400, help="training steps of every variant")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up share of the steps")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs/detection")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of the table")
    ap.add_argument("--out", default="detection", help="result name under --results")
    ap.add_argument("--no-readme", action="store_true", help="do not fill the README's table")
    ap.add_argument(
        "--cached-only", action="store_true", help="write the table from the pieces run so far"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not args.cached_only:
        prepare_data(
            args.work, args.train_images, args.test_images, args.image_size, args.data_seed,
            cue_clearance=args.cue_clearance, cue_px=args.cue_px,
        )  # fmt: skip
    pieces: dict[str, list[dict[str, Any]]] = {}
    for name in args.variants:
        results = [r for s in args.seeds if (r := run_piece(name, s, args)) is not None]
        if results:
            pieces[name] = results
    rows = summarise(pieces)
    targets = check_targets(pieces)
    generator = read_manifest(args.work / "train")["config"] if pieces else {}
    meta = {
        **environment(torch.device("cpu")),
        "command": shlex.join(
            ["python", "benchmarks/detection.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "cells": "mean (spread = max - min, n = seeds)",
        "data": f"tiny-det {args.image_size} px, {args.train_images} train (seed "
        f"{args.data_seed}) / {args.test_images} test images (seed {args.data_seed + 1}), "
        f"objects {generator.get('min_object_px')}-{generator.get('max_object_px')} px, a "
        f"{args.cue_px} px cue at least {args.cue_clearance} x the side from every object",
        "training": f"{args.steps} steps of {args.batch_size}, AdamW lr {args.lr} wd "
        f"{args.weight_decay}, warm-up {args.warmup} + cosine, grad-norm clip 1, random "
        f"hflip, {args.threads} torch threads",
        "seeds": args.seeds,
        "targets": targets,
        "total_s": round(time.perf_counter() - start, 1),
    }
    notes = "\n".join(
        [
            "COCO box AP on the test images at their own resolution (the 2x control's boxes "
            "scaled back). Every tiny-det object is at most "
            f"{generator.get('max_object_px')} px a side, so all are COCO-small (< 32² px): "
            "AP_small is mAP, and AP_medium / AP_large are nan (no object of those sizes; "
            "the generator caps objects at half the image, too small for COCO-large at "
            f"{args.image_size} px). img/s: training images per second of the whole loop "
            "(data loading included); peak: one training step's tracked tensor memory "
            "(gattn.budget.measure_peak_memory). Pieces run in separate sittings compare "
            "speeds across processes.",
            "",
            "## Targets (issue 18)",
            "",
            *[f"- {k}: {v}" for k, v in targets.items()],
            "",
        ]
    )
    json_path, md_path = write_results(args.out, rows, COLUMNS, meta, notes, args.results)
    raw = [r for rs in pieces.values() for r in rs]
    _atomic_write(args.results / f"{args.out}_runs.json", json.dumps(raw, indent=1) + "\n")
    if not args.no_readme:
        shown = ["variant", "input_px", "map", "map_50", "map_small", "map_agnostic", "train_img_s",
                 "img_s_vs_p3", "peak_mib", "peak_vs_p3"]  # fmt: skip
        lines = "".join(f"- {k}: {v}\n" for k, v in targets.items())
        fill_readme("detection", markdown_table(rows, shown) + "\n" + lines)
    for k, v in targets.items():
        print(f"{k}: {v}")
    print(f"wrote {json_path} and {md_path} in {meta['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
