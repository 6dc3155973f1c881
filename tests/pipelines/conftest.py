"""Pipeline tests log to a throw-away MLflow store, never to the project's mlflow.db, share
one way of starting Ray (:func:`pipelines.ray_session.local_ray`: local, on loopback, without a
dashboard, shut down after), one tiny prepared data set, one way of finding a free port, and
one way of running the whole pipeline: a scratch copy of the project on a tiny params profile
(:func:`tiny_project`) driven through the ``gattn`` command line (:func:`gattn_cli`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# Applied to the project's params.yaml for sections it has (a stage section lands with its
# stage). Sizes only: the same code paths and search space as the default run.
TINY_SIZES: dict[str, list[str]] = {
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
        "tune.epochs=1",
        "tune.grace_period=1",
        "tune.max_train_samples=16",
        "tune.max_val_samples=8",
        "tune.time_budget_s=120",
    ],
    "finetune": [
        "finetune.epochs=1",
        "finetune.warmup_epochs=0.0",
        "finetune.max_samples=16",
        "finetune.max_val_samples=8",
        "finetune.cpus_per_worker=1",
        # One epoch on a few images against a one-epoch trial is noise, not a regression.
        "finetune.search_tolerance=null",
    ],
    "evaluate": [
        "evaluate.max_samples=8",
        "evaluate.erf_images=2",
        "evaluate.tta_scales=[1.0]",
    ],
}
# A smaller search (one family, two blocks, one size) and no preset points: for tests that
# check the pipeline's plumbing rather than the default search.
TINY_SPACE = [
    "tune.budgets_gib=[0.05, 1.0]",
    "tune.families={cnn: {backbone: gattn_local_cnn}}",
    "tune.modules=[none, global_attn]",
    "tune.batch_sizes=[8]",
    "tune.img_sizes=[32]",
    "tune.points_to_evaluate=[]",
]


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    return store


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """A function that returns a free TCP port on 127.0.0.1."""

    def find() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return find


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray instance (2 CPUs, 127.0.0.1, auth off) for one test module."""
    pytest.importorskip("ray")
    from pipelines.ray_session import local_ray

    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    with local_ray(num_cpus=2):
        yield
    mp.undo()


@pytest.fixture(scope="module")
def prepared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny prepared ``cue-seg`` set at 32 px without large images, for one test module:
    ``PREPARED_SAMPLES`` images (a module constant; default 20)."""
    from pipelines.config import Params
    from pipelines.stages.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    data = {
        "num_samples": getattr(request.module, "PREPARED_SAMPLES", 20),
        "image_size": 32,
        "large": {"num_samples": 0},
        "grid_samples": 2,
    }
    prepare(Params.model_validate({"data": data}), root / "prepared", root / "reports")
    return root / "prepared"


def _tiny_params(dst: Path, small_space: bool, overrides: Sequence[str]) -> None:
    from pipelines.config import load_params, set_override

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, sizes in TINY_SIZES.items():
        if section in data:
            for o in [*sizes, *(TINY_SPACE if small_space and section == "tune" else [])]:
                set_override(data, o)
    for o in overrides:
        set_override(data, o)
    for section in ("pretrain", "tune", "finetune"):
        if section in data:
            data[section]["storage"] = str(dst / "outputs" / "ray")
    (dst / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    load_params(dst / "params.yaml")  # the profile itself must validate


@pytest.fixture(scope="session")
def tiny_project() -> Callable[..., Path]:
    """``make(dst, overrides=(), small_space=True)``: a scratch git + DVC repository at
    ``dst`` holding the project's code, dvc.yaml and its params.yaml at tiny sizes
    (``TINY_SIZES``; with ``small_space``, also a small search without preset points), with
    ``overrides`` (``key=value``) applied last."""

    def make(dst: Path, overrides: Sequence[str] = (), small_space: bool = True) -> Path:
        for item in ("gattn", "pipelines"):
            shutil.copytree(ROOT / item, dst / item, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "dvc.yaml", dst / "dvc.yaml")
        _tiny_params(dst, small_space, overrides)
        subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
        subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dst, check=True)
        return dst

    return make


@pytest.fixture(scope="session")
def gattn_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run(repo, *args, timeout=600)``: ``gattn ARGS`` in ``repo`` on its copy of the code,
    as a user runs it (the environment's ``bin`` on PATH, Ray's token auth off)."""

    def run(repo: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = dict(os.environ, RAY_AUTH_MODE="disabled")
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        env["PYTHONPATH"] = str(repo)  # the copied code, not the checkout's
        return subprocess.run(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
