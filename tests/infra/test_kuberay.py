"""KubeRay manifests (infra/k8s): one image and one ray version throughout (the installed
ray), RayJobs that run exactly what ``gattn launch`` submits on the RayCluster's spec, GPUs
requested by GPU workers only, the GPU profile fitting the pods, and a RayService carrying
the deploy stage's serve config for an app that exists."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from pipelines.cli import COMMANDS
from pipelines.commands.launch import EXCLUDES, STAGES, entrypoint
from pipelines.config import load_params

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"
GPU = "nvidia.com/gpu"
WORKDIR = "/mnt/cluster_storage/gattn"  # the RayJobs' --workdir (on the shared volume)
STORE = "http://mlflow:5000"


def documents(folder: Path) -> list[dict[str, Any]]:
    """The Kubernetes objects in ``folder/*.yaml`` (other YAML, e.g. compose files, skipped)."""
    docs = (d for p in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()))
    return [d for d in docs if isinstance(d, dict) and "kind" in d]


DOCS = documents(K8S)


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every Ray cluster spec: the RayCluster's, each RayJob's, the RayService's."""
    out = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in of_kind("RayCluster")]
    for d in of_kind("RayJob"):
        out.append((f"RayJob/{d['metadata']['generateName']}", d["spec"]["rayClusterSpec"]))
    for d in of_kind("RayService"):
        out.append((f"RayService/{d['metadata']['name']}", d["spec"]["rayClusterConfig"]))
    return out


SPECS = cluster_specs()


def groups(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    workers = [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    return [("head", spec["headGroupSpec"]), *workers]


def containers(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, c) for name, g in groups(spec) for c in g["template"]["spec"]["containers"]]


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity (``7``, ``500m``, ``28Gi``) as a number (bytes for memory)."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def worker_pod(spec: dict[str, Any], group: str = "gpu") -> dict[str, float]:
    (g,) = [g for name, g in groups(spec) if name == group]
    (c,) = g["template"]["spec"]["containers"]
    return {k: quantity(v) for k, v in c["resources"]["requests"].items()}


def test_manifests_are_kuberay_v1_and_complete() -> None:
    kinds = sorted(d["kind"] for d in DOCS if d["apiVersion"] == "ray.io/v1")
    assert kinds == ["RayCluster", "RayJob", "RayJob", "RayService"]


@pytest.mark.parametrize(("name", "spec"), SPECS, ids=[s[0] for s in SPECS])
def test_one_image_and_the_installed_ray_version(name: str, spec: dict[str, Any]) -> None:
    assert spec["rayVersion"] == ray.__version__
    images = {c["image"] for _, c in containers(spec)}
    reference = {c["image"] for _, c in containers(SPECS[0][1])}
    assert images == reference and len(images) == 1
    assert spec["authOptions"] == {"mode": "token"}  # Ray's token auth on the jobs port


def test_the_image_is_built_on_the_installed_ray() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.M)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", base), base
    assert "-e ." in dockerfile


@pytest.mark.parametrize(("name", "spec"), SPECS, ids=[s[0] for s in SPECS])
def test_resources_gpus_on_gpu_workers_only(name: str, spec: dict[str, Any]) -> None:
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # drivers/proxy only
    for group, c in containers(spec):
        req, lim = c["resources"]["requests"], c["resources"]["limits"]
        assert req == lim, f"{group}: requests != limits (KubeRay wants Guaranteed pods)"
        assert quantity(req["cpu"]) >= 1 and quantity(req["memory"]) >= 4 * 2**30, group
        gpus = quantity(req.get(GPU, 0))
        assert (gpus >= 1) == ("gpu" in group), f"{group}: {GPU}={gpus}"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
        tolerations = g["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == GPU for t in tolerations), "GPU nodes are usually tainted"


@pytest.mark.parametrize(("name", "spec"), SPECS, ids=[s[0] for s in SPECS])
def test_every_ray_pod_logs_to_the_mlflow_service(name: str, spec: dict[str, Any]) -> None:
    (service,) = [d for d in documents(ROOT / "infra" / "mlflow") if d["kind"] == "Service"]
    (port,) = service["spec"]["ports"]
    assert f"http://{service['metadata']['name']}:{port['port']}" == STORE
    for group, c in containers(spec):
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("MLFLOW_TRACKING_URI") == STORE, group


def test_rayjobs_run_what_gattn_launch_submits_on_the_rayclusters_spec() -> None:
    (cluster,) = of_kind("RayCluster")
    dockerfile = (K8S / "Dockerfile").read_text()
    (code,) = re.findall(r"^WORKDIR\s+(\S+)", dockerfile, flags=re.M)
    jobs = of_kind("RayJob")
    for job in jobs:
        spec = job["spec"]
        assert spec["rayClusterSpec"] == cluster["spec"]
        stage = job["metadata"]["generateName"].removeprefix("gattn-").rstrip("-")
        assert spec["entrypoint"] == entrypoint(stage, "params-gpu.yaml", (), WORKDIR)
        commands = re.findall(r"python -m pipelines\.cli (\S+)", spec["entrypoint"])
        assert commands == list(STAGES[stage]) and set(commands) <= set(COMMANDS)
        for command in re.split(r"\s*&&\s*", spec["entrypoint"]):
            shlex.split(command)  # each part is well-formed shell
        renv = yaml.safe_load(spec["runtimeEnvYAML"])
        assert renv["working_dir"] == code  # the project inside the image
        assert renv["excludes"] == list(EXCLUDES)
        assert spec["shutdownAfterJobFinishes"] is True
    assert sorted(j["metadata"]["generateName"] for j in jobs) == ["gattn-pretrain-", "gattn-tune-"]


def test_the_workdir_is_on_a_shared_volume_mounted_everywhere() -> None:
    (claim,) = of_kind("PersistentVolumeClaim")
    assert "ReadWriteMany" in claim["spec"]["accessModes"]
    (cluster,) = of_kind("RayCluster")
    for group, g in groups(cluster["spec"]):
        pod = g["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        (c,) = pod["containers"]
        name = claim["metadata"]["name"]
        mounts = [m for m in c["volumeMounts"] if claims.get(m["name"]) == name]
        assert any(WORKDIR.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), group


def test_the_gpu_profile_fits_the_gpu_worker_pods() -> None:
    params = load_params(ROOT / "params-gpu.yaml")
    (cluster,) = of_kind("RayCluster")
    pod, group = worker_pod(cluster["spec"]), cluster["spec"]["workerGroupSpecs"][0]
    assert params.tune.cpus_per_trial <= pod["cpu"]
    assert 0 < params.tune.gpus_per_trial <= pod[GPU]
    for train in (params.pretrain, params.finetune):
        assert train.use_gpu and train.cpus_per_worker <= pod["cpu"]
        assert train.num_workers <= group["maxReplicas"] * pod[GPU]  # the gang can start


def test_rayservice_carries_the_deploy_stage_config_for_an_app_that_exists() -> None:
    from ray.serve.schema import ServeDeploySchema

    from pipelines import contracts
    from pipelines.serve.runner import SERVE_HIGH_THROUGHPUT_ENV
    from pipelines.stages.deploy import serve_config

    (service,) = of_kind("RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    params = load_params(ROOT / "params-gpu.yaml")
    expected = serve_config(params.serve, params.serve.model, STORE)
    assert config == expected, (
        "serveConfigV2 differs from what `gattn deploy --params params-gpu.yaml` writes; "
        f"replace it with:\n{yaml.safe_dump(expected, sort_keys=False)}"
    )
    (app,) = config["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    contracts.AppArgs.model_validate(app["args"])  # the builder accepts these args
    assert app["args"]["model"].startswith(f"models:/{params.tracking.model_name}@")
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {contracts.INGRESS, contracts.DEPLOYMENT}
    model, ingress = deployments[contracts.DEPLOYMENT], deployments[contracts.INGRESS]

    # the replicas fit the GPU worker pods that exist at minReplicas, with their token: the
    # model replicas by GPU and CPU, the ingress replicas in the CPUs the model leaves
    spec = service["spec"]["rayClusterConfig"]
    pod, group = worker_pod(spec), spec["workerGroupSpecs"][0]
    actor = model["ray_actor_options"]
    assert actor["num_cpus"] <= pod["cpu"] and actor.get("num_gpus", 0) <= pod[GPU]
    per_pod = min(pod["cpu"] // actor["num_cpus"], pod[GPU] // actor.get("num_gpus", 1))
    assert model["num_replicas"] <= group["minReplicas"] * per_pod
    spare = group["minReplicas"] * pod["cpu"] - model["num_replicas"] * actor["num_cpus"]
    assert ingress["num_replicas"] * ingress["ray_actor_options"]["num_cpus"] <= spare
    token_env = app["args"]["auth_token_env"]
    for group_name, c in containers(spec):
        env = {e["name"]: e.get("value") for e in c["env"]}
        if group_name != "head":
            assert token_env in env, group_name
        # every node's Serve runs the high-throughput mode the serve benchmark measures
        assert SERVE_HIGH_THROUGHPUT_ENV.items() <= env.items(), group_name
