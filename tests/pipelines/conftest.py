"""Pipeline tests log to a throw-away MLflow store, never to the project's mlflow.db, share
one way of starting Ray (:func:`pipelines.ray_utils.local_ray`: local, on loopback, without a
dashboard, shut down after), one tiny prepared data set and one way of finding a free port."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


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
    from pipelines.ray_utils import local_ray

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
    from pipelines.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    data = {
        "num_samples": getattr(request.module, "PREPARED_SAMPLES", 20),
        "image_size": 32,
        "large": {"num_samples": 0},
        "grid_samples": 2,
    }
    prepare(Params.model_validate({"data": data}), root / "prepared", root / "reports")
    return root / "prepared"
