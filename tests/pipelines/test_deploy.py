"""The deploy stage: a Serve config (``serve build`` format) for the registered model."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from gattn.models import build_model, read_config, save_model
from pipelines import tracking
from pipelines.cli import main
from pipelines.config import ParamsError, ServeParams
from pipelines.io import write_json
from pipelines.registry import register
from pipelines.serve.runner import cpus_needed, load_config
from pipelines.stages.deploy import deploy

serve = pytest.importorskip("ray.serve")
from ray.serve.schema import ServeDeploySchema  # noqa: E402

SEG = {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 3, "head": "fcn"}


@pytest.fixture
def finetuned(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    meta = {"task": "seg", "classes": ["bg", "a", "b"], "img_size": 32}
    return save_model(build_model(SEG), SEG, tmp_path / "finetuned", **meta)


def test_deploy_writes_a_valid_config_for_the_registered_version(
    tmp_path: Path, finetuned: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATTN_MODEL_CACHE", str(tmp_path / "cache"))
    with tracking.stage_run("finetune", {}, "gattn", root=tmp_path):
        register(finetuned, "gattn-model")
        version = register(finetuned, "gattn-model")  # the finetune stage records its version
    cfg = read_config(finetuned)
    write_json(
        finetuned / "config.json",
        {**cfg, "registered": {"name": "gattn-model", "version": version}},
    )
    params = tmp_path / "params.yaml"
    serve_section = {"num_replicas": 2, "num_cpus": 0.5, "max_batch_size": 4, "port": 8123}
    params.write_text(json.dumps({"serve": serve_section}))
    out = tmp_path / "deploy"
    args = ["--params", str(params), "--model-dir", str(finetuned), "--out", str(out)]
    assert main(["deploy", *args]) == 0

    raw = yaml.safe_load((out / "serve_config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1" and config.http_options.port == 8123
    (app,) = config.applications
    assert app.route_prefix == "/" and app.import_path == "pipelines.serve.app:build_app"
    assert app.args["model"] == "models:/gattn-model/2"  # pinned, not whatever is champion later
    assert app.args["tracking_uri"] == os.environ["MLFLOW_TRACKING_URI"]
    assert app.args["max_batch_size"] == 4 and app.args["auth_token_env"] is None
    ingress, model = app.deployments
    assert model.name == "GattnModel" and model.num_replicas == 2
    assert model.ray_actor_options.num_cpus == 0.5
    assert ingress.name == "GattnIngress" and ingress.num_replicas == 1
    assert ingress.max_ongoing_requests == ServeParams().max_ongoing_requests
    assert app.args["concurrent_batches"] == 4  # two batches in flight per model replica

    # What `gattn serve` reads back: the same config; 2 x 0.5 + 1 CPUs for a local Ray.
    assert load_config(out / "serve_config.yaml") == config and cpus_needed(config) == 2
    with pytest.raises(ParamsError, match="gattn deploy"):
        load_config(tmp_path / "nowhere.yaml")
    # The import path names the builder, and the builder takes the args.
    module, attr = app.import_path.split(":")
    assert isinstance(getattr(importlib.import_module(module), attr)(app.args), serve.Application)

    (run,) = mlflow.search_runs(
        experiment_names=["gattn"],
        filter_string="tags.`gattn.stage` = 'deploy'",
        output_format="list",
    )
    assert run.data.tags["gattn.served_model"] == "models:/gattn-model/2"
    assert run.data.params["serve.num_replicas"] == "2"


def test_unregistered_folder_and_explicit_model(tmp_path: Path, finetuned: Path) -> None:
    summary = deploy(ServeParams(), finetuned, tmp_path / "a")
    assert summary["model"] == str(finetuned.resolve()) and summary["task"] == "seg"
    args = yaml.safe_load((tmp_path / "a" / "serve_config.yaml").read_text())["applications"][0]
    assert args["args"]["model"] == str(finetuned.resolve()) and "tracking_uri" not in args["args"]
    chosen = deploy(ServeParams(model=str(finetuned)), tmp_path / "missing", tmp_path / "b")
    assert chosen["model"] == str(finetuned.resolve())


def test_nothing_to_serve_or_broken_model_writes_nothing(tmp_path: Path, finetuned: Path) -> None:
    with pytest.raises(ParamsError, match="gattn finetune"):
        deploy(ServeParams(), tmp_path / "missing", tmp_path / "out")
    cfg = read_config(finetuned)
    del cfg["img_size"], cfg["model"]["num_classes"]
    write_json(finetuned / "config.json", cfg)
    with pytest.raises(ParamsError, match=r"config.json: not a valid ModelMeta \(img_size"):
        deploy(ServeParams(), finetuned, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeParams(max_batch_size=32, max_ongoing_requests=8)
    # each ingress keeps two batches in flight per model replica, so room for all of them
    assert ServeParams(num_replicas=3, max_ongoing_requests=96).batches_in_flight == 6
    assert ServeParams(num_replicas=3, concurrent_batches=1).batches_in_flight == 1
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeParams(num_replicas=3, max_batch_size=32, max_ongoing_requests=64)
    ServeParams(num_replicas=3, concurrent_batches=2, max_batch_size=32, max_ongoing_requests=64)
