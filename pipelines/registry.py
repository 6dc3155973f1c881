"""The MLflow Model Registry for gattn model folders, without pickled objects.

A model folder (``model.safetensors`` + ``config.json``, see :mod:`gattn.models.io`) is logged
as an MLflow pyfunc *from code* (``python_model`` is the path of
:mod:`pipelines.pyfunc_model`, which MLflow stores as source and runs on load) with the
folder as its ``model`` artifact, and registered as a new version of a registered model. An
alias (``champion``) points at the version to serve.

:func:`resolve_model` turns ``models:/name@alias`` or ``models:/name/N`` into a local model
folder (downloaded once into a cache keyed by store and version; versions are immutable), or
checks and returns a local folder, so every consumer (evaluate, explain, deploy, serve) takes
either.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from gattn.models.io import CONFIG, WEIGHTS, read_config
from pipelines.io import write_json
from pipelines.pyfunc_model import MAX_DETECTIONS, MODEL_ARTIFACT
from pipelines.tracking import tracking_uri

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
CACHE_ENV = "GATTN_MODEL_CACHE"
REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "numpy")
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")


def requirements() -> list[str]:
    """Pinned pip requirements of a registered model (the installed versions)."""
    return [f"{pkg}=={metadata.version(pkg)}" for pkg in REQUIREMENTS]


def signature(cfg: dict[str, Any]) -> Any:
    """Tensor signature of a model folder's config: float32 ``(B, C, H, W)`` images in,
    logits ``(B, K, H, W)`` (seg) or ``(B, K)`` (cls) out, or detections ``(B, MAX_DETECTIONS,
    6)`` (det: :mod:`pipelines.pyfunc_model`)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model = cfg["model"]
    k = int(model["num_classes"])
    task = model.get("task", "cls")
    out_shape = {"seg": (-1, k, -1, -1), "det": (-1, MAX_DETECTIONS, 6)}.get(task, (-1, k))
    f32 = np.dtype("float32")
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, int(model.get("in_chans", 3)), -1, -1))]),
        outputs=Schema([TensorSpec(f32, out_shape)]),
    )


def register(model_dir: str | Path, name: str, alias: str = "champion") -> int:
    """Register a model folder as a new version of ``name`` and point ``alias`` at it.

    Logged to MLflow's current tracking URI (set it with :func:`pipelines.tracking.setup`, as
    :func:`~pipelines.tracking.stage_run` does), inside the active run when there is one (the
    version links to it). Only ``config.json`` and ``model.safetensors`` are stored, as the
    pyfunc's ``model`` artifact.

    Args:
        model_dir: A folder written by :func:`gattn.models.save_model`.
        name: Registered model name (``tracking.model_name``).
        alias: Alias set on the new version.

    Returns:
        The new version number.

    Raises:
        FileNotFoundError: ``model_dir`` is not a model folder.
    """
    import mlflow

    cfg = read_config(Path(model_dir))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / MODEL_ARTIFACT
        folder.mkdir()
        for f in (CONFIG, WEIGHTS):
            shutil.copy(Path(model_dir) / f, folder / f)
        with warnings.catch_warnings():
            # The tensor signature stands in for an input example (which would be run).
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_CODE),
                artifacts={MODEL_ARTIFACT: str(folder)},
                registered_model_name=name,
                signature=signature(cfg),
                pip_requirements=requirements(),
                metadata={"gattn_task": cfg["model"].get("task", "cls")},
            )
    version = int(info.registered_model_version)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))
    return version


def cache_root() -> Path:
    """Where registry downloads are kept: ``$GATTN_MODEL_CACHE`` or ``~/.cache/gattn/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "gattn" / "models"


def _model_version(uri: str, store: str) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    match = _URI.match(uri)
    if not match:
        raise ValueError(
            f"{uri!r}: expected models:/NAME@ALIAS (e.g. models:/gattn-model@champion) or "
            "models:/NAME/VERSION"
        )
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    name = match["name"]
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except MlflowException as err:
        raise FileNotFoundError(
            f"{uri}: not in the registry at {store} ({err.message}); "
            "run `gattn finetune` to register a model, or check MLFLOW_TRACKING_URI"
        ) from None


def _download(mv: Any, store: str, dest: Path) -> None:
    """Download a registered pyfunc and move its model folder to ``dest`` (atomically)."""
    import mlflow
    from mlflow.models import Model

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        # Resolve the version's storage location with a client bound to ``store``: a
        # ``models:/`` download would consult the process-wide default registry instead.
        client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
        location = client.get_model_version_download_uri(mv.name, mv.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp)
        flavor = Model.load(local).flavors["python_function"]
        folder = Path(local) / flavor["artifacts"][MODEL_ARTIFACT]["path"]
        cfg = read_config(folder)
        cfg["registered"] = {"name": mv.name, "version": int(mv.version)}
        write_json(folder / CONFIG, cfg)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(folder, dest)


def resolve_model(
    uri_or_path: str | Path, cache_dir: Path | None = None, store: str | None = None
) -> Path:
    """A local model folder for a registry URI or a path.

    Args:
        uri_or_path: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` (looked up in the current
            MLflow tracking store) or a local model folder.
        cache_dir: Download cache (default :func:`cache_root`); a version already downloaded
            from the same store is reused.
        store: Tracking/registry URI; default :func:`pipelines.tracking.tracking_uri` (the
            project's store, or ``$MLFLOW_TRACKING_URI``).

    Returns:
        The folder (``config.json`` + ``model.safetensors``). A downloaded folder's
        ``config.json`` also holds ``registered: {name, version}``.

    Raises:
        FileNotFoundError: the path is not a model folder, or the URI is not registered.
        ValueError: a ``models:/`` URI of another form.
    """
    text = str(uri_or_path)
    if not text.startswith("models:/"):
        path = Path(text)
        read_config(path)
        return path
    store = store or tracking_uri()
    mv = _model_version(text, store)
    key = hashlib.sha256(f"{store}|{mv.source}".encode()).hexdigest()[:12]
    dest = Path(cache_dir or cache_root()) / mv.name / f"v{mv.version}-{key}"
    try:
        read_config(dest)
    except FileNotFoundError:
        _download(mv, store, dest)
    return dest
