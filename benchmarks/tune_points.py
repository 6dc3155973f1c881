"""Does each fixed point of the search find the distant cue on every seed?

Usage: ``python benchmarks/tune_points.py [--seeds 0 1 2 3] [--modules global_attn ppm ...]``

Each point of ``tune.points_to_evaluate`` (params.yaml) on the local CNN (the local baseline
and every global module at one setting) is trained exactly as a tune trial trains it
(:func:`pipelines.stages.tune.trial.train_config`: ``tune.epochs`` epochs, warm-up + cosine,
class-balanced loss, one CPU thread) at each seed on the prepared default data
(``data/prepared``), and its
validation mIoU is recorded after every epoch. On cue-seg a model that has not found the cue
names every shape with one class (mIoU about 0.3-0.55); one that has is near 0.8 after the
trial's epochs. Each (point, seed) is one resumable piece cached under ``--work``. Writes
``benchmarks/results/<--out>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from pipelines.config import load_params  # noqa: E402
from pipelines.stages.tune.space import model_config, summary  # noqa: E402
from pipelines.stages.tune.stage import data_context  # noqa: E402
from pipelines.stages.tune.trial import train_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOUND = 0.7  # val mIoU above which the cue has been found (the local baseline stays near 0.35)


def run_point(sample: dict[str, Any], seed: int, params: Any, data: Path, work: Path) -> list:
    """Validation mIoU after every epoch of one trial (cached)."""
    key = json.dumps({"sample": sample, "seed": seed, "tune": params.tune.model_dump(mode="json")})
    done = work / f"{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"
    if done.is_file():
        return json.loads(done.read_text())
    p = params.tune
    context = data_context(data, None, p, seed)
    cfg = model_config(sample, p, context.kind, context.num_classes, context.in_chans)
    curve: list[float] = []
    row: dict[str, Any] = {"steps": 0}
    t0 = time.perf_counter()
    train_config(
        sample, context, p, cfg, torch.device("cpu"), row, lambda r: curve.append(r["quality"])
    )
    print(f"[points] {summary(sample)} seed {seed}: {curve} ({time.perf_counter() - t0:.0f} s)")
    work.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(curve))
    return curve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--modules", nargs="+", default=None, help="points by module (default: all)")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--data", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs/tune_points")
    ap.add_argument("--out", default="tune_points")
    args = ap.parse_args(argv)
    if not (args.data / "splits.json").is_file():
        ap.error(f"{args.data}: no prepared data; run `gattn prepare` first")
    torch.set_num_threads(1)  # as a trial (tune.cpus_per_trial)
    params = load_params(args.params, [])
    points = [
        dict(s)
        for s in params.tune.points_to_evaluate
        if s.get("family") == "cnn" and (args.modules is None or s["module"] in args.modules)
    ]
    rows = []
    for sample in points:
        curves = [run_point(sample, seed, params, args.data, args.work) for seed in args.seeds]
        finals = [c[-1] for c in curves]
        found = [next((i + 1 for i, q in enumerate(c) if q >= FOUND), None) for c in curves]
        rows.append(
            {
                "point": summary(sample),
                "final_mean": statistics.fmean(finals),
                "final_spread": max(finals) - min(finals),
                "found_cue": f"{sum(f is not None for f in found)}/{len(found)}",
                "epoch_found": " / ".join("–" if f is None else str(f) for f in found),
                "per_seed_final": " / ".join(f"{q:.3f}" for q in finals),
                "curves": " | ".join(" ".join(f"{q:.2f}" for q in c) for c in curves),
            }
        )
    meta = {
        **environment(torch.device("cpu")),
        "command": shlex.join(
            ["python", "benchmarks/tune_points.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "seeds": args.seeds,
        "epochs": params.tune.epochs,
    }
    note = (
        f"Validation mIoU (all val images). found_cue: seeds whose mIoU reached {FOUND} "
        "(epoch_found: the first epoch it did); curves: mIoU after each epoch, per seed."
    )
    columns = ["point", "final_mean", "final_spread", "found_cue", "epoch_found"]
    write_results(args.out, rows, [*columns, "per_seed_final", "curves"], meta, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
