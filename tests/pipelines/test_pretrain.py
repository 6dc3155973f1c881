"""The pretrain stage on Ray Train: outputs reload, MLflow metrics, run names, fault resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from pipelines.cli import main
from pipelines.config import Params, PretrainParams
from pipelines.data import data_fingerprint
from pipelines.stages.prepare import prepare
from pipelines.stages.pretrain import (
    build_objective,
    encoder_config,
    load_encoder,
    pretrain,
    run_name,
)

ray = pytest.importorskip("ray")

PLOTS = ("curves.png", "objective.png")  # the stage's figures in dvc.yaml, for either method

TINY = {
    "img_size": 32,
    "epochs": 3,
    "batch_size": 4,
    "log_every_n_steps": 1,
    "warmup_epochs": 0.5,
    "max_samples": 8,
    "cpus_per_worker": 1,
    "backbone_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2},
    "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
}


PREPARED_SAMPLES = 16  # the shared `prepared` fixture's size


def tiny(tmp_path: Path, **overrides) -> PretrainParams:
    return PretrainParams.model_validate({**TINY, "storage": str(tmp_path / "ray"), **overrides})


def test_run_name_follows_params_and_data(tmp_path: Path, prepared: Path) -> None:
    p = tiny(tmp_path)
    data = data_fingerprint(prepared)
    assert run_name(p, 0, data) == run_name(tiny(tmp_path), 0, data)
    assert run_name(p, 0, data) != run_name(p, 0, "other data")
    other = {"num_samples": 16, "image_size": 32, "large": {"num_samples": 0}, "grid_samples": 2}
    prepare(Params.model_validate({"seed": 1, "data": other}), tmp_path / "p", tmp_path / "r")
    assert data_fingerprint(tmp_path / "p") != data
    assert run_name(p, 0) == run_name(tiny(tmp_path), 0)
    assert run_name(p, 0) != run_name(p, 1)
    assert run_name(p, 0) != run_name(tiny(tmp_path, lr=2e-3), 0)
    assert run_name(p, 0) != run_name(tiny(tmp_path, mae={"mask_ratio": 0.5}), 0)
    # Evaluation and logging knobs do not change training: the run (and its resume) is kept.
    assert run_name(p, 0) == run_name(tiny(tmp_path, probe={"k": 3}, log_every_n_steps=7), 0)


@pytest.mark.slow
def test_cli_pretrains_mae_logs_and_outputs_reload(
    tmp_path: Path, prepared: Path, ray_local: None
) -> None:
    ddp = {"num_workers": 2, "batch_size": 2}  # DDP over gloo: 2 steps an epoch per worker
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"pretrain": {**TINY, **ddp, "storage": str(tmp_path / "ray")}}))
    models, reports = tmp_path / "models", tmp_path / "reports"
    args = ["--params", str(params), "--data", str(prepared)]
    assert main(["pretrain", *args, "--out", str(models), "--reports", str(reports)]) == 0

    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["resumed_from_epoch"] == 0
    for name in PLOTS:
        assert (reports / name).stat().st_size > 1000, name
    for key in ("probe_knn_acc", "probe_knn_acc_random", "probe_linear_acc"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["probe_knn_gain"] == pytest.approx(
        metrics["probe_knn_acc"] - metrics["probe_knn_acc_random"]
    )
    splits = json.loads((prepared / "splits.json").read_text())
    assert metrics["probe_num_train"] == len(splits["train"])
    assert metrics["probe_num_eval"] == len(splits["val"])
    with open(reports / "loss_curve.csv") as f:
        curve = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in curve] == [1, 2, 3]  # more than the checkpoints kept
    assert float(curve[-1]["loss"]) == pytest.approx(metrics["loss"])

    encoder = load_encoder(models)
    weights = load_file(str(models / "encoder.safetensors"))
    assert set(weights) == set(encoder.state_dict())
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert encoder(torch.rand(2, 3, 32, 32)).shape == (2, 32)  # headless: pooled features
    # Training changed the encoder: it differs from a fresh one built with the same seed.
    p = tiny(tmp_path, **ddp)
    torch.manual_seed(0)
    fresh = build_objective(p, encoder_config(p)).encoder.state_dict()
    assert any(not torch.equal(fresh[k], weights[k]) for k in fresh)

    runs = mlflow.search_runs(experiment_names=["gattn"], output_format="list")
    assert len(runs) == 1
    run, client = runs[0], mlflow.MlflowClient()
    assert run.data.params["pretrain.method"] == "mae"
    assert run.data.metrics["epochs"] == 3.0
    assert run.data.tags["gattn.ray_run"] == run_name(p, 0, data_fingerprint(prepared))
    history = client.get_metric_history(run.info.run_id, "epoch_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    by_step = {m.step: m.value for m in history}
    assert by_step == pytest.approx({int(r["epoch"]): float(r["loss"]) for r in curve})
    # Per step (2 steps an epoch, averaged over workers): the epoch loss is their mean.
    steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "step_loss")}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    assert (steps[5] + steps[6]) / 2 == pytest.approx(by_step[3])
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "step_lr")}
    assert lrs[1] < lrs[2] and lrs[6] < lrs[2]  # warm-up, then cosine decay
    assert run.data.metrics["probe_knn_acc_random"] == metrics["probe_knn_acc_random"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    assert {"encoder/encoder.safetensors", "encoder/config.json"} <= artifacts


@pytest.mark.slow
def test_dino_worker_failure_resumes_from_checkpoint(
    tmp_path: Path, prepared: Path, ray_local: None
) -> None:
    dino = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "n_local": 2, "local_size": 16}
    p = tiny(tmp_path, method="dino", epochs=2, max_failures=1, dino=dino)
    p = p.model_copy(update={"probe": p.probe.model_copy(update={"every_epoch": True})})
    out = pretrain(p, 0, prepared, tmp_path / "m", tmp_path / "r", fail_at_epoch=2)
    flag = Path(out["storage"]) / f"{out['run_name']}.injected-failure"
    assert flag.exists(), "the injected failure never happened"
    # The last attempt started from epoch 1's checkpoint, not from scratch, and finished.
    assert out["metrics"]["resumed_from_epoch"] == 1
    assert [(r["epoch"], r["start_epoch"]) for r in out["history"]] == [(1, 0), (2, 1)]
    assert {"teacher_entropy", "teacher_kl_to_mean"} <= set(out["history"][-1])
    # Per-step history survives the resume: epoch 1's steps come from its checkpoint.
    assert [s["step"] for s in out["steps"]] == [1, 2, 3, 4]
    assert {"teacher_entropy", "teacher_kl_to_mean", "lr"} <= set(out["steps"][0])
    for name in (*PLOTS, "knn_curve.png"):  # DINO fills the same declared plots as MAE
        assert (tmp_path / "r" / name).stat().st_size > 1000, name
    # probe.every_epoch: a k-NN per epoch (epoch 1's from its checkpoint); the last one is the
    # exported teacher's, which the end-of-run probe scores again (threads may move one vote).
    curve = [r["probe_knn_acc"] for r in out["history"]]
    assert len(curve) == 2 and all(0.0 <= a <= 1.0 for a in curve)
    m = out["metrics"]
    assert abs(curve[-1] - m["probe_knn_acc"]) <= 1 / m["probe_num_eval"] + 1e-9
    assert load_encoder(tmp_path / "m")(torch.rand(1, 3, 32, 32)).shape == (1, 32)
