"""Sliding-window inference at the sizes users run, against its baselines in the same process.

Usage: ``python benchmarks/sliding_window.py [--reps 3] [--threads 1] [--device cpu]
[--sizes 512,1024,2048] [--windows 128,256,512] [--models cnn,vit] [--no-monai]
[--clock auto|cpu|wall]`` (``--reps 1`` for a quick look).

For every image size (512², 1024², 2048²), window (128, 256, 512 px; overlap a quarter of the
window; combinations with a window larger than the image are skipped) and model, times:

- ``ours``: :func:`gattn.inference.sliding_window` with its defaults (gaussian blending,
  ``batch_size="auto"``, ``channels_last="auto"``).
- ``fixed 8``: the same with ``batch_size=8, channels_last=False``, the defaults before
  ``"auto"`` (what issue 14 measured).
- ``article``: the source article's loop, written out plainly in :func:`article_loop`: one
  window per forward, uniform averaging. Fixed only where it was wrong: the output has the
  model's channels (not the image's) and the last window of a row/column is flush with the
  edge (else pixels past the last stride are never covered and divide 0 by 0). Its global
  feature pass is left out (no model here takes one).
- ``forwards``: the article's forward passes alone (its model time, no stitching).
- ``monai``: MONAI's ``sliding_window_inference`` (gaussian, same window positions) at the
  best of ``sw_batch_size`` 1, 4 and 8, when MONAI is installed (``pip install .[bench]``).

Models (random weights; time does not depend on them): ``cnn``, a 3-conv segmentation net
(3 -> 16 -> 16 -> 4 channels, 3x3, ReLU), and ``vit``, the ``gattn_vit_global`` segmenter
(patch 16, width 96, depth 4, FCN head) built at the window size. Batch 1: one image.

Each configuration runs every variant once untimed (the outputs of ``ours`` with constant
blending and of the article's loop must agree, asserted), then ``--reps`` rounds that time
every variant once in turn (interleaved, so load from other processes hits all of them;
each round starts one variant later); the table shows median times, and ratios as the
median over rounds of the ratio within a round. With one thread on CPU the clock is the
process's CPU time (equal to wall time on an idle core, and not inflated when other
processes share it). Target on CPU: ours <= 1.0x the article's loop and <= 0.9x MONAI.
Writes ``benchmarks/results/sliding_window[-<device>].{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, sync, write_results  # noqa: E402

from gattn.inference import sliding_window, window_starts  # noqa: E402
from gattn.models import build_model  # noqa: E402

try:
    from monai.inferers import sliding_window_inference
except ImportError:  # the bench extra is not installed
    sliding_window_inference = None

SIZES, WINDOWS = (512, 1024, 2048), (128, 256, 512)
MONAI_BATCHES = (1, 4, 8)
NUM_CLASSES = 4
TARGET_ARTICLE, TARGET_MONAI = 1.0, 0.9


def cnn3() -> nn.Module:
    """The issue's 3-conv segmentation net."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, NUM_CLASSES, 3, padding=1),
    )


def vit(window: int) -> nn.Module:
    """A small global ViT segmenter at the window size (patch 16: 1024 tokens at 512 px)."""
    return build_model(
        {
            "task": "seg",
            "backbone": "gattn_vit_global",
            "num_classes": NUM_CLASSES,
            "img_size": window,
            "head": "fcn",
            "head_channels": 32,
            "backbone_kwargs": {"patch_size": 16},
        }
    )


MODELS: dict[str, Callable[[int], nn.Module]] = {"cnn": lambda _window: cnn3(), "vit": vit}


@torch.no_grad()
def article_loop(model: nn.Module, image: torch.Tensor, window: int, overlap: int) -> torch.Tensor:
    """The article's ``SlidingWindowInference``, fixed only where it was wrong (see above)."""
    B, _, H, W = image.shape
    stride = window - overlap
    ys = list(range(0, H - window + 1, stride))
    xs = list(range(0, W - window + 1, stride))
    if ys[-1] != H - window:  # fix: the article skips the bottom edge
        ys.append(H - window)
    if xs[-1] != W - window:  # fix: and the right edge
        xs.append(W - window)
    output: torch.Tensor | None = None
    count = torch.zeros(1, 1, H, W, device=image.device)
    for h in ys:
        for w in xs:
            pred = model(image[:, :, h : h + window, w : w + window])
            if output is None:  # fix: the model's channels, not zeros_like(image)
                output = torch.zeros(B, pred.shape[1], H, W, device=image.device)
            output[:, :, h : h + window, w : w + window] += pred
            count[:, :, h : h + window, w : w + window] += 1
    assert output is not None
    return output / count


def num_windows(size: int, window: int, overlap: int) -> int:
    stride = window - overlap
    per_axis = -(-(size - window) // stride) + 1
    return per_axis * per_axis


@torch.no_grad()
def forwards_only(model: nn.Module, image: torch.Tensor, window: int, overlap: int) -> None:
    """The article's forward passes alone (one NCHW window each, no stitching): the share of
    its time that any one-window-at-a-time method pays for the model."""
    stride = window - overlap
    for h in window_starts(image.shape[-2], window, stride):
        for w in window_starts(image.shape[-1], window, stride):
            model(image[:, :, h : h + window, w : w + window])


def variants(
    model: nn.Module, window: int, overlap: int, monai: bool
) -> dict[str, Callable[[torch.Tensor], object]]:
    runs: dict[str, Callable[[torch.Tensor], object]] = {
        "ours": lambda x: sliding_window(model, x, window, overlap),
        "fixed 8": lambda x: sliding_window(
            model, x, window, overlap, batch_size=8, channels_last=False
        ),
        "article": lambda x: article_loop(model, x, window, overlap),
        "forwards": lambda x: forwards_only(model, x, window, overlap),
    }
    if monai and sliding_window_inference is not None:
        for bs in MONAI_BATCHES:
            runs[f"monai {bs}"] = lambda x, bs=bs: sliding_window_inference(
                x, window, bs, model, overlap=overlap / window, mode="gaussian"
            )
    return runs


@torch.no_grad()
def bench_config(
    model_name: str,
    size: int,
    window: int,
    device: torch.device,
    reps: int,
    monai: bool,
    clock: Callable[[], float],
) -> dict[str, object]:
    torch.manual_seed(0)
    model = MODELS[model_name](window).to(device).eval()
    image = torch.rand(1, 3, size, size, device=device)
    overlap = window // 4
    runs = variants(model, window, overlap, monai)

    outputs = {name: run(image) for name, run in runs.items()}  # warm-up, untimed
    constant = sliding_window(model, image, window, overlap, blend="constant")
    torch.testing.assert_close(constant, outputs["article"], rtol=1e-4, atol=1e-4)
    del outputs, constant

    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            run = runs[name]
            sync(device)
            t0 = clock()
            run(image)
            sync(device)
            times[name].append(clock() - t0)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}

    def ratio(a: str, b: str) -> float:
        """Median over rounds of the time ratio within a round (load drifts between rounds)."""
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    row: dict[str, object] = {
        "model": model_name,
        "image": size,
        "window": window,
        "windows": num_windows(size, window, overlap),
        "ours_ms": ms["ours"],
        "fixed8_ms": ms["fixed 8"],
        "article_ms": ms["article"],
        "forwards_ms": ms["forwards"],
        "ours/article": ratio("ours", "article"),
        "forwards/article": ratio("forwards", "article"),
        "fixed8/article": ratio("fixed 8", "article"),
    }
    monai_ms = {bs: ms[f"monai {bs}"] for bs in MONAI_BATCHES if f"monai {bs}" in ms}
    if monai_ms:
        best = min(monai_ms, key=monai_ms.__getitem__)
        row.update(
            {
                **{f"monai{bs}_ms": v for bs, v in monai_ms.items()},
                "monai_best_ms": monai_ms[best],
                "monai_best_bs": best,
                "ours/monai": ratio("ours", f"monai {best}"),
            }
        )
    return row


def verdict(rows: list[dict[str, object]]) -> dict[str, str]:
    out = {}
    for key, target in (("ours/article", TARGET_ARTICLE), ("ours/monai", TARGET_MONAI)):
        values = [float(r[key]) for r in rows if key in r]  # type: ignore[arg-type]
        if values:
            worst = max(values)
            met = "met" if worst <= target else "NOT met"
            out[key] = f"worst {worst:.2f}x over {len(values)} sizes (target <= {target}x: {met})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU)")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--windows", default=",".join(map(str, WINDOWS)))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--no-monai", action="store_true", help="skip the MONAI baseline")
    parser.add_argument(
        "--clock",
        choices=("auto", "cpu", "wall"),
        default="auto",
        help="cpu: this process's CPU time (auto with 1 thread on CPU), wall: elapsed time",
    )
    parser.add_argument("--name", default="sliding_window", help="results file name")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    clock_name = args.clock
    if clock_name == "auto":
        clock_name = "cpu" if device.type == "cpu" and args.threads == 1 else "wall"
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    monai = not args.no_monai
    if monai and sliding_window_inference is None:
        print("MONAI not installed (pip install .[bench]): no MONAI baseline", flush=True)

    rows = []
    start = time.perf_counter()
    for model_name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            for window in map(int, args.windows.split(",")):
                if window > size:
                    continue
                row = bench_config(model_name, size, window, device, args.reps, monai, clock)
                rows.append(row)
                print(
                    f"{model_name} {size}² / {window}: ours {row['ours_ms']:.0f} ms, "
                    f"ours/article {row['ours/article']:.2f}, "
                    f"ours/monai {row.get('ours/monai', float('nan')):.2f}",
                    flush=True,
                )
    meta = {
        **environment(device),
        "reps": args.reps,
        "clock": clock_name,
        "overlap": "window / 4",
        "monai": None if sliding_window_inference is None or not monai else _monai_version(),
        "seconds": round(time.perf_counter() - start),
        "verdict": verdict(rows),
    }
    columns = [
        "model",
        "image",
        "window",
        "windows",
        "ours_ms",
        "article_ms",
        "monai_best_ms",
        "monai_best_bs",
        "ours/article",
        "ours/monai",
        "fixed8/article",
        "forwards/article",
    ]
    notes = (
        f"ms: median {clock_name} time of one call on one image ({args.reps} interleaved "
        "rounds; cpu = this process's CPU time, which equals wall time for one thread on an "
        "idle core and is not inflated when other processes take it). ours: defaults "
        '(gaussian, batch_size="auto", channels_last="auto"). fixed 8: batch_size=8, '
        "channels_last=False (the defaults before). article: the article's one-window loop "
        "(uniform averaging, edges fixed). monai: sliding_window_inference (gaussian) at the "
        f"best of sw_batch_size {list(MONAI_BATCHES)}. forwards: the article's forward passes "
        "alone (its model time). Ratios: median over rounds of the ratio within a round "
        "(< 1: ours is faster); monai's best batch is the one with the lowest median time. The "
        "JSON has every variant's time.\n"
    )
    suffix = "" if device.type == "cpu" else f"-{device.type}"
    paths = write_results(f"{args.name}{suffix}", rows, columns, meta, notes)
    print("\n".join(f"{k}: {v}" for k, v in meta["verdict"].items()))
    print(f"wrote {paths[0]} and {paths[1]}")


def _monai_version() -> str:
    import monai

    return str(monai.__version__)


if __name__ == "__main__":
    main()
