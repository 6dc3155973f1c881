"""Pipeline tests log to a throw-away MLflow store, never to the project's mlflow.db, and
share one way of starting Ray: local, on loopback, without a dashboard, shut down after."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    return store


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray instance (2 CPUs, 127.0.0.1, auth off) for one test module."""
    ray = pytest.importorskip("ray")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    yield
    ray.shutdown()
    mp.undo()
