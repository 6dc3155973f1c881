"""The whole chain (issue 9): ``gattn pipeline`` = ``dvc repro`` of the project's dvc.yaml on a
tiny params profile, in a scratch git + DVC repository, under one MLflow parent run.

Checks the properties users rely on: every stage runs and is a child run of one parent run;
a second ``gattn pipeline`` is a no-op (no stage reruns, no new child run); changing one
param reruns only the stage that reads it; the final model is the registry's champion and
the deploy stage's Serve config points at it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from pipelines.config import load_params, set_override

ROOT = Path(__file__).resolve().parents[2]

# Applied to the project's params.yaml for sections it has (a stage section lands with its
# stage). Sizes only: the same code paths as the default run.
TINY: dict[str, list[str]] = {
    "data": [
        "data.num_samples=40",
        "data.image_size=32",
        "data.large.num_samples=1",
        "data.large.image_size=64",
        "data.grid_samples=4",
    ],
    "pretrain": [
        "pretrain.img_size=32",
        "pretrain.epochs=1",
        "pretrain.warmup_epochs=0.0",
        "pretrain.batch_size=8",
        "pretrain.cpus_per_worker=1",
        "pretrain.backbone_kwargs={embed_dim: 32, depth: 1, num_heads: 2}",
        "pretrain.mae.decoder_dim=16",
        "pretrain.mae.decoder_heads=2",
        "pretrain.probe.k=3",
    ],
    "tune": [
        "tune.num_samples=2",
        "tune.budgets_gib=[0.05, 1.0]",
        "tune.families={cnn: {backbone: gattn_local_cnn}}",
        "tune.modules=[none, global_attn]",
        "tune.batch_sizes=[8]",
        "tune.img_sizes=[32]",
        "tune.epochs=1",
        "tune.grace_period=1",
        "tune.max_train_samples=16",
        "tune.max_val_samples=8",
        "tune.time_budget_s=120",
        "tune.points_to_evaluate=[]",
    ],
    "finetune": [
        "finetune.epochs=1",
        "finetune.warmup_epochs=0.0",
        "finetune.max_samples=16",
        "finetune.max_val_samples=8",
        "finetune.cpus_per_worker=1",
    ],
    "evaluate": [
        "evaluate.max_samples=8",
        "evaluate.erf_images=2",
        "evaluate.tta_scales=[1.0]",
    ],
}


def _tiny_params(dst: Path) -> None:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, overrides in TINY.items():
        if section in data:
            for o in overrides:
                set_override(data, o)
    for section in ("pretrain", "tune", "finetune"):
        if section in data:
            data[section]["storage"] = str(dst / "outputs" / "ray")
    (dst / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    load_params(dst / "params.yaml")  # the profile itself must validate


def _gattn(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(repo)  # the copied code, not the checkout's
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("e2e")
    for item in ("gattn", "pipelines"):
        shutil.copytree(ROOT / item, dst / item, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", dst / "dvc.yaml")
    _tiny_params(dst)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dst, check=True)
    return dst


def _runs(store: Path) -> list:
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.mark.slow
def test_pipeline_runs_every_stage_under_one_parent_and_reruns_only_what_changed(
    repo: Path, _mlflow_store: Path
) -> None:
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])

    first = _gattn(repo, "pipeline")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    runs = _runs(_mlflow_store)
    parents = [r for r in runs if r.data.tags.get("gattn.stage") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["gattn.stage"] for r in children) == sorted(stages)
    assert "pretrain.loss" in parents[0].data.metrics  # DVC metrics summarised on the parent

    second = _gattn(repo, "pipeline")
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
    third = _gattn(repo, "pipeline")
    assert third.returncode == 0, third.stderr[-3000:]
    rerun = [r.data.tags.get("gattn.stage") for r in _runs(_mlflow_store)]
    assert {s: rerun.count(s) for s in stages} == {s: 1 + (s == "evaluate") for s in stages}

    # The champion is registered and the deploy stage's Serve config points at it.
    client = mlflow.MlflowClient()
    champion = client.get_model_version_by_alias("gattn-model", "champion")
    serve_cfg = yaml.safe_load((repo / "models" / "deploy" / "serve_config.yaml").read_text())
    assert f"gattn-model/{champion.version}" in yaml.safe_dump(serve_cfg)


def test_a_bad_params_file_fails_before_any_stage(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data:\n  image_sise: 64\n")
    out = _gattn(tmp_path, "pipeline")
    assert out.returncode == 2
    assert "data.image_sise: unknown key" in out.stderr
