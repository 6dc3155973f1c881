"""Ray cluster-launcher configs (infra/ray): valid for the installed ray, a CPU head and GPU
workers that can hold the GPU profile's trials and training workers, nodes that install this
project."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.commands.launch import requirements
from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "infra" / "ray").glob("*.yaml"))
SCHEMA = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]
    }


def capacity(config: dict[str, Any], cpus: float, gpus: float) -> int:
    """How many (cpus, gpus) bundles the cluster holds at its largest (every type at its own
    max_workers, all types together capped by the global max_workers, largest nodes first)."""
    per_node = []
    for t in worker_types(config).values():
        res = t["resources"]
        fit = int(res.get("CPU", 0) // cpus) if cpus else 10**6
        if gpus:
            fit = min(fit, int(res.get("GPU", 0) // gpus))
        per_node += [fit] * t.get("max_workers", config["max_workers"])
    return sum(sorted(per_node, reverse=True)[: config["max_workers"]])


def test_there_are_configs_for_aws_and_gcp() -> None:
    assert {load(p)["provider"]["type"] for p in CONFIGS} == {"aws", "gcp"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_against_the_installed_ray_schema(path: Path) -> None:
    config = load(path)
    jsonschema.validate(config, SCHEMA)  # as written: no unknown keys anywhere
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before launching
    validate_config(prepared)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cpu_head_and_autoscaling_gpu_workers(path: Path) -> None:
    config = load(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"].get("CPU") == 0  # drivers only: trials never land on the head
    workers = worker_types(config)
    assert workers
    for name, t in workers.items():
        assert t["resources"]["GPU"] >= 1, name
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert sum(t["min_workers"] for t in workers.values()) == 0  # idle cluster: no GPU bill


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_gpu_profile_fits_the_cluster(path: Path) -> None:
    config, params = load(path), load_params(ROOT / "params-gpu.yaml")
    tune, pretrain = params.tune, params.pretrain
    # every Tune trial and Train worker can be placed, and pretraining's whole gang at once
    assert capacity(config, tune.cpus_per_trial, tune.gpus_per_trial) >= 1
    assert capacity(config, pretrain.cpus_per_worker, 1) >= pretrain.num_workers
    finetune = params.finetune
    assert capacity(config, finetune.cpus_per_worker, 1) >= finetune.num_workers


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_nodes_install_this_project_with_the_pinned_ray(path: Path) -> None:
    config = load(path)
    remote = [r for r, local in config["file_mounts"].items() if local == "."]
    assert len(remote) == 1, "the project folder is mounted on every node"
    editable = re.compile(rf"-e\s+{re.escape(remote[0])}\b")
    installs = [c for c in config["setup_commands"] if editable.search(c)]
    assert installs, f"no setup command installs {remote[0]} (pip/uv install -e)"
    # `ray start` must run the environment the project was installed into
    venv_bin = re.search(r"(\S+)/bin/uv pip install --python (\S+)/bin/python", installs[0])
    path_lines = [c.replace("$HOME", "~") for c in config["setup_commands"] if "PATH=" in c]
    assert venv_bin and any(f"{venv_bin[2]}/bin:" in c for c in path_lines)
    # the pin the nodes install admits the ray running here (and the job client)
    (pin,) = [r for r in map(Requirement, requirements()) if r.name == "ray"]
    assert ray.__version__ in pin.specifier
    for heavy in (".venv", "data", "outputs", "mlflow.db", ".git"):
        assert heavy in config["rsync_exclude"], heavy


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_node_starts_ray_with_token_auth_and_the_token(path: Path) -> None:
    config = load(path)
    token = "~/.ray/auth_token"
    assert config["file_mounts"].get(token) == token
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    for cmd in (c for c in starts if "ray start" in c):
        assert "RAY_AUTH_MODE=token" in cmd, cmd
