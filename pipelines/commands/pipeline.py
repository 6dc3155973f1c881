"""``gattn pipeline``: one MLflow parent run around ``dvc repro``.

DVC runs each stage as its own process (``gattn prepare``, ``gattn pretrain``, …). To group
them, this driver opens a parent run, exports its id as ``$GATTN_PARENT_RUN_ID`` (which
:func:`pipelines.tracking.stage_run` reads, so every stage run is its child), runs
``dvc repro`` with the project's virtual environment first on ``PATH``, and closes the parent
run as FINISHED or FAILED with the DVC metrics of the finished pipeline logged on it. Stages
that DVC finds up to date are not rerun and log nothing new.

``--params params-<name>.yaml`` (a profile: a whole params file, e.g. params-fashion-mnist.yaml)
runs ``dvc exp run --name <name> -S KEY=VALUE ...`` instead: a named DVC experiment whose
overrides make ``params.yaml`` hold the profile's values (:mod:`pipelines.profiles`), since
DVC's stages read ``params.yaml`` only. ``dvc exp show`` then lists it beside the default runs;
the workspace keeps its results (``params.yaml``, ``dvc.lock``, the outputs), as after any
``dvc exp run``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipelines.config import load_params
from pipelines.profiles import check_overrides, experiment_name, profile_overrides
from pipelines.tracking import PARENT_RUN_ENV, flatten, setup

PARAMS = Path("params.yaml")  # the file DVC's stages read (dvc.yaml: params)


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


def experiment_names(cwd: Path) -> set[str]:
    """The names of the DVC experiments on the current commit (``dvc exp list``)."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    return set(out.stdout.split()) if out.returncode == 0 else set()


def free_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``, ... if taken (DVC refuses a name twice per commit)."""
    n, candidate = 1, name
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def dvc_command(params: Path, dvc_args: list[str], cwd: Path, name: str | None = None) -> list[str]:
    """The DVC command line (after ``dvc``) that runs the pipeline on ``params``:
    ``repro`` for ``params.yaml`` itself, otherwise ``exp run --name NAME -S ...`` with the
    overrides that make ``params.yaml`` hold the profile (:func:`profile_overrides`), checked
    on a copy of ``params.yaml`` first (:func:`check_overrides`)."""
    if (cwd / params).resolve() == (cwd / PARAMS).resolve():
        return ["repro", *dvc_args]
    overrides = profile_overrides(cwd / params, cwd / PARAMS)
    check_overrides(cwd / params, cwd / PARAMS, overrides)
    name = name or free_name(experiment_name(params), experiment_names(cwd))
    sets = [arg for o in overrides for arg in ("-S", o)]
    return ["exp", "run", "--name", name, *sets, *dvc_args]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params",
        default=str(PARAMS),
        help="params file, checked before DVC starts; another than params.yaml (a profile, "
        "e.g. params-fashion-mnist.yaml) runs as a named DVC experiment (dvc exp run -S ...)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="the DVC experiment's name with a profile (default: the file's name less "
        "'params-', with -2, -3, ... if the commit has one of that name)",
    )
    parser.add_argument(
        "dvc_args",
        nargs=argparse.REMAINDER,
        help="further `dvc repro` (`dvc exp run`) arguments, e.g. `-- --force tune` (after --)",
    )


def run(args: argparse.Namespace) -> int:
    import mlflow

    params = load_params(args.params)  # a bad params.yaml fails here, before any stage
    cwd = Path.cwd()
    experiment_id = setup(params.tracking.experiment)
    dvc_args = [a for a in args.dvc_args if a != "--"]
    command = dvc_command(Path(args.params), dvc_args, cwd, args.name)
    print("pipeline: dvc " + shlex.join(command), flush=True)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="pipeline", tags={"gattn.stage": "pipeline"}
    ) as parent:
        env[PARENT_RUN_ENV] = parent.info.run_id
        mlflow.log_param("dvc_args", " ".join(dvc_args) or "(none)")
        mlflow.log_param("params_file", str(args.params))
        mlflow.log_text("dvc " + shlex.join(command), "dvc_command.txt")
        t0 = time.perf_counter()
        code = subprocess.run(
            [sys.executable, "-m", "dvc", *command], cwd=cwd, env=env, check=False
        ).returncode
        mlflow.log_metric("pipeline_wall_s", time.perf_counter() - t0)
        mlflow.log_metrics(dvc_metrics(cwd))
        if code != 0:
            mlflow.end_run(status="FAILED")
    what = "repro" if command[0] == "repro" else "exp run"
    print(f"pipeline: dvc {what} exited {code}; MLflow parent run {parent.info.run_id}")
    return code
