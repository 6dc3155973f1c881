"""``gattn pipeline``: one MLflow parent run around ``dvc repro``.

DVC runs each stage as its own process (``gattn prepare``, ``gattn pretrain``, …). To group
them, this driver opens a parent run, exports its id as ``$GATTN_PARENT_RUN_ID`` (which
:func:`pipelines.tracking.stage_run` reads, so every stage run is its child), runs
``dvc repro`` with the project's virtual environment first on ``PATH``, and closes the parent
run as FINISHED or FAILED with the DVC metrics of the finished pipeline logged on it. Stages
that DVC finds up to date are not rerun and log nothing new.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipelines.config import load_params
from pipelines.tracking import PARENT_RUN_ENV, flatten, setup


def dvc_metrics(cwd: Path) -> dict[str, float]:
    """``dvc metrics show --json`` flattened to ``{"<file>.<key>": value}`` (numbers only)."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "metrics", "show", "--json"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        return {}
    metrics: dict[str, float] = {}
    for rev in json.loads(out.stdout).values():
        for file, entry in (rev.get("data") or {}).items():
            stem = Path(file).parent.name or Path(file).stem
            for key, value in flatten(entry.get("data") or {}).items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    metrics[f"{stem}.{key}"[:250]] = float(value)
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default="params.yaml", help="params file (checked before DVC starts)"
    )
    parser.add_argument(
        "dvc_args",
        nargs=argparse.REMAINDER,
        help="further `dvc repro` arguments, e.g. `-- --force tune` (after --)",
    )


def run(args: argparse.Namespace) -> int:
    import mlflow

    params = load_params(args.params)  # a bad params.yaml fails here, before any stage
    cwd = Path.cwd()
    experiment_id = setup(params.tracking.experiment)
    dvc_args = [a for a in args.dvc_args if a != "--"]
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="pipeline", tags={"gattn.stage": "pipeline"}
    ) as parent:
        env[PARENT_RUN_ENV] = parent.info.run_id
        mlflow.log_param("dvc_args", " ".join(dvc_args) or "(none)")
        t0 = time.perf_counter()
        code = subprocess.run(
            [sys.executable, "-m", "dvc", "repro", *dvc_args], cwd=cwd, env=env, check=False
        ).returncode
        mlflow.log_metric("pipeline_wall_s", time.perf_counter() - t0)
        mlflow.log_metrics(dvc_metrics(cwd))
        if code != 0:
            mlflow.end_run(status="FAILED")
    print(f"pipeline: dvc repro exited {code}; MLflow parent run {parent.info.run_id}")
    return code
