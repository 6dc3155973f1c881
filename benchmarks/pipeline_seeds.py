"""The default pipeline's headline figures over training seeds: mean and spread, fresh runs.

Usage: ``python benchmarks/pipeline_seeds.py [--seeds 0 1 2 3 4]`` after ``make run``.

For each seed the tune, finetune and evaluate stages run as ``make run`` runs them (their own
commands, ``--set seed=S``) on the prepared default data and pretrained encoder of the last
``make run``, into ``outputs/pipeline_seeds/seed-S/`` with an MLflow store of their own (the
project's registry and its ``champion`` are not touched). The run of ``params.yaml``'s own seed
is the last ``make run`` itself: its reports are read, not recomputed, so the table and the
README agree with ``make run``. A seed whose reports exist is not rerun (delete its folder to
rerun it).

Figures per seed: the search's best trial and the global-attention fixed point (val mIoU, on
the trial's validation images), the champion's val mIoU on the same images, its test mIoU at
64 px, and on the large 256 px images sliding windows without and with global-context feedback.
Writes ``benchmarks/results/<--out>.{json,md}``: one row per seed, then mean and spread
(max - min), and the README's seeds table (``--no-readme``: not).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fill_readme, markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tune", "finetune", "evaluate")
FIGURES = [
    "search_best",
    "global_attn_point",
    "champion_val",
    "champion_test",
    "large_sliding",
    "large_sliding_global",
    "feedback_gain",
]


def run_seed(seed: int, work: Path, gattn: str) -> None:
    """The tune, finetune and evaluate stages at ``seed`` into ``work``; a stage whose report
    exists is not rerun. A finetune that the stage refuses (below its trial: see
    ``finetune.search_tolerance``) publishes no model, so evaluate is skipped."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(work / 'mlflow.db').resolve()}"}
    data = ["--data", str(ROOT / "data/prepared")]
    pretrained = ["--pretrained", str(ROOT / "models/pretrained")]
    out = {stage: ["--reports", str(work / "reports" / stage)] for stage in STAGES}
    steps = {
        "tune": [*data, *pretrained, "--out", str(work / "models/tune")],
        "finetune": [*data, *pretrained, "--best", str(work / "models/tune/best.json")],
        "evaluate": [*data, "--model", str(work / "model")],
    }
    steps["finetune"] += ["--out", str(work / "model")]
    for stage in STAGES:
        if (work / "reports" / stage / "metrics.json").is_file():
            continue
        if stage == "evaluate" and not (work / "model").is_dir():
            print(f"[seeds] seed {seed}: no published model, evaluate skipped", flush=True)
            return
        cmd = [gattn, stage, *(["--set", f"seed={seed}"] if stage != "evaluate" else [])]
        cmd += [*steps[stage], *out[stage]]
        print(f"[seeds] seed {seed}: {shlex.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, env=env, cwd=ROOT)
        if done.returncode and stage != "finetune":
            raise SystemExit(f"seed {seed}: gattn {stage} failed ({done.returncode})")


def figures(reports: Path) -> dict[str, Any]:
    """The headline figures of one run's reports folder."""
    with open(reports / "tune/trials.csv", newline="") as f:
        trials = [t for t in csv.DictReader(f) if t["status"] == "ok"]
    point = [
        float(t["quality"])
        for t in trials
        if t["module"] == "global_attn" and t["family"] == "cnn" and t["position"] == "last"
    ]
    finetune = json.loads((reports / "finetune/metrics.json").read_text())
    row: dict[str, Any] = {
        "search_best": max(float(t["quality"]) for t in trials),
        "search_pick": "{family} +{module}@{position}".format(
            **max(trials, key=lambda t: float(t["quality"]))
        ),
        "global_attn_point": point[0] if point else None,
        "champion_val": finetune["search_split_score"],
        "champion_test": None,
        "large_sliding": None,
        "large_sliding_global": None,
        "feedback_gain": None,
    }
    if not (reports / "evaluate/metrics.json").is_file():
        row["search_pick"] += " (finetune refused: below its trial)"
        return row
    evaluate = json.loads((reports / "evaluate/metrics.json").read_text())
    sliding, feedback = evaluate["large.sliding"]["miou"], evaluate["large.sliding_global"]["miou"]
    row.update(
        champion_test=evaluate["test.plain"]["miou"],
        large_sliding=sliding,
        large_sliding_global=feedback,
        feedback_gain=feedback - sliding,
    )
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work", type=Path, default=ROOT / "outputs/pipeline_seeds")
    ap.add_argument("--out", default="pipeline_seeds")
    ap.add_argument("--no-readme", action="store_true", help="do not fill the README's table")
    args = ap.parse_args(argv)
    own_seed = int(yaml.safe_load((ROOT / "params.yaml").read_text())["seed"])
    gattn = str(Path(sys.executable).parent / "gattn")
    rows = []
    for seed in args.seeds:
        if seed == own_seed:
            reports = ROOT / "reports"
            if not (reports / "evaluate/metrics.json").is_file():
                raise SystemExit("reports/: missing; run `make run` first")
        else:
            work = args.work / f"seed-{seed}"
            reports = work / "reports"
            run_seed(seed, work, gattn)
        rows.append({"seed": seed, **figures(reports)})
    for name, fn in (("mean", statistics.fmean), ("spread", lambda v: max(v) - min(v))):
        rows.append(
            {
                "seed": name,
                **{
                    k: fn(v)
                    if (v := [r[k] for r in rows[: len(args.seeds)] if r[k] is not None])
                    else None
                    for k in FIGURES
                },
            }
        )
    meta = {
        "command": shlex.join(
            ["python", "benchmarks/pipeline_seeds.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "data": "the default cue-seg data of make run (data/prepared), the same for every seed",
        "seeds": args.seeds,
    }
    note = (
        "mIoU. search_best: the tune stage's best trial; global_attn_point: its fixed point "
        "'local CNN + global self-attention x2' (both on all val images, after the trial's "
        "epochs); champion_val: the fine-tuned champion on the same val images; champion_test: "
        "on the test split at 64 px; large_*: the 256 px test images through 64 px sliding "
        "windows without / with global-context feedback. spread = max - min over seeds."
    )
    write_results(args.out, rows, ["seed", "search_pick", *FIGURES], meta, note)
    if not args.no_readme:
        fill_readme("seeds", readme_table(rows))
    return 0


def readme_table(rows: list[dict[str, Any]]) -> str:
    """The README's seeds table (between its ``<!-- seeds -->`` markers)."""
    names = {
        "seed": "seed",
        "search_pick": "search pick",
        "search_best": "search best (trial)",
        "champion_val": "champion, same val images",
        "champion_test": "champion test",
        "large_sliding": "large sliding",
        "large_sliding_global": "+ feedback",
    }
    shown = [
        {names[k]: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items() if k in names}
        for r in rows
    ]
    return markdown_table(shown, list(names.values()))


if __name__ == "__main__":
    sys.exit(main())
