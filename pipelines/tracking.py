"""MLflow tracking shared by every stage: one store, resolved to an absolute path.

With no ``MLFLOW_TRACKING_URI`` MLflow 3 falls back to ``sqlite:///mlflow.db`` *relative to the
current directory*, so a stage run from another folder would write a second, silent store. We
resolve the store (and the artifact root next to it) against the project root instead;
``MLFLOW_TRACKING_URI`` still overrides.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PARENT_RUN_ENV = "GATTN_PARENT_RUN_ID"


def tracking_uri(root: Path | None = None) -> str:
    """The tracking URI: ``$MLFLOW_TRACKING_URI`` or an absolute sqlite store under ``root``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def artifact_root(root: Path | None = None) -> str:
    """Absolute artifact location for experiments created by this project."""
    return (Path(root or Path.cwd()).resolve() / "mlartifacts").as_uri()


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into ``{"a.b": value}`` for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def setup(experiment: str, root: Path | None = None) -> str:
    """Point MLflow at the project store and select ``experiment`` (created if missing).

    Returns:
        The experiment id.
    """
    mlflow.set_tracking_uri(tracking_uri(root))
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        uri = mlflow.get_tracking_uri()
        location = None if not uri.startswith("sqlite:") else artifact_root(root)
        return mlflow.create_experiment(experiment, artifact_location=location)
    return exp.experiment_id


@contextlib.contextmanager
def stage_run(
    stage: str, params: Mapping[str, Any], experiment: str = "gattn", root: Path | None = None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one pipeline stage, with its params logged and tagged by stage.

    The run is nested under ``$GATTN_PARENT_RUN_ID`` when a pipeline driver set one.
    """
    experiment_id = setup(experiment, root)
    parent = os.environ.get(PARENT_RUN_ENV)
    tags = {"gattn.stage": stage}
    if parent:
        tags["mlflow.parentRunId"] = parent
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags) as run:
        mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        yield run
