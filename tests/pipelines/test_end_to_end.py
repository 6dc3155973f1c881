"""The whole chain (issue 9): ``gattn pipeline`` = ``dvc repro`` of the project's dvc.yaml on a
tiny params profile, in a scratch git + DVC repository, under one MLflow parent run.

Checks the properties users rely on: every stage runs and is a child run of one parent run;
a second ``gattn pipeline`` is a no-op (no stage reruns, no new child run); changing one
param reruns only the stage that reads it; the final model is the registry's champion and
the deploy stage's Serve config points at it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import yaml


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, tiny_project: Callable[..., Path]) -> Path:
    return tiny_project(tmp_path_factory.mktemp("e2e"))


def _runs(store: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.slow
def test_pipeline_runs_every_stage_under_one_parent_and_reruns_only_what_changed(
    repo: Path, _mlflow_store: Path, gattn_cli: Callable
) -> None:
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])

    # every stage, each starting its own Ray: minutes on 2 cores, more when they are shared
    first = gattn_cli(repo, "pipeline", timeout=1800)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = _runs(_mlflow_store)
    parents = [r for r in runs if r.data.tags.get("gattn.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["gattn.stage"] for r in children) == sorted(stages)
    assert "pretrain.loss" in parents[0].data.metrics  # DVC metrics summarised on the parent

    second = gattn_cli(repo, "pipeline")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Data and pipelines are up to date" in second.stdout + second.stderr
    runs = _runs(_mlflow_store)
    stage_runs = [r for r in runs if r.data.tags.get("gattn.stage") in stages]
    assert len(stage_runs) == len(stages)  # nothing reran
    # The search's trials are children of the tune stage's run.
    tune_run = next(r for r in stage_runs if r.data.tags["gattn.stage"] == "tune")
    trials = [r for r in runs if r.data.tags.get("gattn.stage") == "tune.trial"]
    assert trials and all(r.data.tags["mlflow.parentRunId"] == tune_run.info.run_id for r in trials)

    # One evaluate param changes: only the evaluate stage reruns.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["max_samples"] = 6
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = gattn_cli(repo, "pipeline")
    assert third.returncode == 0, third.stderr[-3000:]
    rerun = [r.data.tags.get("gattn.stage") for r in _runs(_mlflow_store)]
    assert {s: rerun.count(s) for s in stages} == {s: 1 + (s == "evaluate") for s in stages}

    # The champion is registered and the deploy stage's Serve config points at it.
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("gattn-model", "champion")
    serve_cfg = yaml.safe_load((repo / "models" / "deploy" / "serve_config.yaml").read_text())
    assert f"gattn-model/{champion.version}" in yaml.safe_dump(serve_cfg)


def test_a_bad_params_file_fails_before_any_stage(tmp_path: Path, gattn_cli: Callable) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  image_sise: 64\n")
    out = gattn_cli(tmp_path, "pipeline")
    assert out.returncode == 2
    assert "data.image_sise: unknown key" in out.stderr
