"""Sliding-window inference and test-time augmentation against their naive forms, same run.

Usage: ``python benchmarks/inference.py [--device cuda] [--threads 1] [--reps 5]``

1. ``sliding_window`` (windows batched, optional channels-last) against the source article's
   one-window-at-a-time loop (:func:`naive_sliding_window`: a forward per window, uniform
   averaging, windows at ``range(0, H - w + 1, stride)``). The image size is chosen so that
   the article's loop covers every pixel (``(H - w)`` a multiple of the stride), where both
   are defined; with ``blend="constant"`` their outputs must agree (asserted). Target: at most
   1.0x the loop's time on CPU, at least 3x faster on a GPU.
2. ``tta`` (the image and its flip in one batch per scale) against the sequential form (one
   forward per view) on 64 and 128 px images. Outputs must agree (asserted). Target: at
   most 0.7x the time.

Models: the local CNN segmenter (``gattn_local_cnn`` + FCN head) and a small global ViT
segmenter (``gattn_vit_global`` + PSP head, ``dynamic_img_size`` so TTA's scaled views fit),
random weights (timing does not depend on them). Batch 1: one image, as served.
Writes ``benchmarks/results/inference[-<device>].{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_time, write_results  # noqa: E402

from gattn.inference import sliding_window, tta  # noqa: E402
from gattn.models import build_model  # noqa: E402

WINDOW, OVERLAP, IMAGE = 64, 16, 256  # (256 - 64) / 48 = 4: the naive loop covers every pixel
TTA_SIZES = (64, 128)  # the training size, and twice it
MODELS = {
    "local_cnn": {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 4, "head": "fcn"},
    "vit_global": {
        "task": "seg",
        "backbone": "gattn_vit_global",
        "num_classes": 4,
        "img_size": WINDOW,
        "head": "psp",
        "head_channels": 32,
        "backbone_kwargs": {"dynamic_img_size": True},  # TTA's scaled views
    },
}


@torch.no_grad()
def naive_sliding_window(
    model: nn.Module, image: torch.Tensor, window: int, overlap: int
) -> torch.Tensor:
    """The article's loop: one window per forward pass, uniform averaging (its output is
    allocated with the model's channels here; the article used the image's)."""
    B, _, H, W = image.shape
    stride = window - overlap
    out: torch.Tensor | None = None
    count = torch.zeros(1, 1, H, W, device=image.device)
    for y in range(0, H - window + 1, stride):
        for x in range(0, W - window + 1, stride):
            logits = model(image[:, :, y : y + window, x : x + window])
            if out is None:
                out = torch.zeros(B, logits.shape[1], H, W, device=image.device)
            out[:, :, y : y + window, x : x + window] += logits
            count[:, :, y : y + window, x : x + window] += 1
    assert out is not None
    return out / count


@torch.no_grad()
def sequential_tta(
    model: nn.Module, image: torch.Tensor, scales: Sequence[float], flip: bool = True
) -> torch.Tensor:
    """One forward per view (scale x flip), probabilities undone and averaged."""
    H, W = image.shape[-2:]
    total = torch.zeros(())
    views = 0
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        x = image if size == (H, W) else F.interpolate(image, size=size, mode="bilinear")
        for flipped in (False, True) if flip else (False,):
            probs = model(x.flip(-1) if flipped else x).float().softmax(1)
            probs = probs.flip(-1) if flipped else probs
            if probs.shape[-2:] != (H, W):
                probs = F.interpolate(probs, size=(H, W), mode="bilinear")
            total = total + probs
            views += 1
    return total / views


def bench_sliding(
    name: str, model: nn.Module, device: torch.device, reps: int
) -> list[dict[str, object]]:
    image = torch.rand(1, 3, IMAGE, IMAGE, device=device)
    reference = naive_sliding_window(model, image, WINDOW, OVERLAP)
    base = median_time(lambda: naive_sliding_window(model, image, WINDOW, OVERLAP), device, 1, reps)
    rows: list[dict[str, object]] = [
        {
            "bench": "sliding",
            "model": name,
            "variant": "article loop",
            "ms": 1000 * base,
            "ratio": 1.0,
            "baseline": True,
        }
    ]
    for batch in (1, 4, 16):
        for channels_last in (False, True):

            def run(b: int = batch, cl: bool = channels_last) -> torch.Tensor:
                return sliding_window(
                    model,
                    image,
                    WINDOW,
                    OVERLAP,
                    batch_size=b,
                    blend="constant",
                    channels_last=cl,
                )

            torch.testing.assert_close(run(), reference, rtol=1e-4, atol=1e-4)
            seconds = median_time(run, device, 1, reps)
            variant = f"batch {batch}" + (", channels-last" if channels_last else "")
            rows.append(
                {
                    "bench": "sliding",
                    "model": name,
                    "variant": variant,
                    "ms": 1000 * seconds,
                    "ratio": seconds / base,
                    "baseline": False,
                }
            )
    return rows


def bench_tta(
    name: str, model: nn.Module, device: torch.device, reps: int
) -> list[dict[str, object]]:
    scales = (0.75, 1.0, 1.25)
    rows: list[dict[str, object]] = []
    for size in TTA_SIZES:
        image = torch.rand(1, 3, size, size, device=device)
        reference = sequential_tta(model, image, scales)
        torch.testing.assert_close(tta(model, image, scales), reference, rtol=1e-4, atol=1e-5)
        base = median_time(lambda x=image: sequential_tta(model, x, scales), device, 1, reps)
        batched = median_time(lambda x=image: tta(model, x, scales), device, 1, reps)
        for variant, seconds in (("sequential", base), ("batched", batched)):
            rows.append(
                {
                    "bench": "tta",
                    "model": name,
                    "variant": f"{variant} ({size}px, scales {list(scales)}, flip)",
                    "ms": 1000 * seconds,
                    "ratio": seconds / base,
                    "baseline": variant == "sequential",
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    rows = []
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = build_model(cfg).to(device).eval()
        rows += bench_sliding(name, model, device, args.reps)
        rows += bench_tta(name, model, device, args.reps)
        print(f"inference benchmark: {name} done", flush=True)
    best: dict[tuple[str, str], float] = {}
    for r in rows:
        if r["ratio"] is not None and not r["baseline"]:
            key = (str(r["bench"]), str(r["model"]))
            best[key] = min(best.get(key, float("inf")), float(r["ratio"]))
    target = {"sliding": 1.0 if device.type == "cpu" else 1 / 3, "tta": 0.7}
    verdict = {
        f"{b}/{m}": f"{v:.2f}x (target <= {target[b]:.2f}x: "
        f"{'met' if v <= target[b] else 'NOT met'})"
        for (b, m), v in best.items()
    }
    meta = {
        **environment(device),
        "window": WINDOW,
        "overlap": OVERLAP,
        "image": IMAGE,
        "best_ratio": verdict,
    }
    notes = (
        "ratio = time / the naive baseline's time in the same run (lower is better). Outputs "
        "of every variant equal the baseline's (asserted).\n"
    )
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    paths = write_results(
        f"inference{suffix}", rows, ["bench", "model", "variant", "ms", "ratio"], meta, notes
    )
    print("\n".join(f"{k}: {v}" for k, v in verdict.items()))
    print(f"wrote {paths[0]} and {paths[1]}")


if __name__ == "__main__":
    main()
