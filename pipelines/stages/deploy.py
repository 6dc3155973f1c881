"""``deploy`` stage: the Ray Serve config for the fine-tuned, registered model.

Reads ``serve`` (and ``tracking``) from params.yaml and ``models/finetuned/config.json``;
writes ``models/deploy/serve_config.yaml`` in the format of ``serve build`` (a
``ServeDeploySchema``: ``http_options``, one application whose ``import_path`` is the app
builder :func:`pipelines.serve.app.build_app`, its ``args``, and the replicas and resources of its
two deployments, the HTTP ingress and the model). Run it with ``gattn serve`` locally,
``serve deploy`` on a cluster, or put it in a KubeRay ``RayService``.

The model is ``serve.model`` when set (a ``models:/`` URI or a folder), else the registry
version the finetune stage registered, pinned (``models:/NAME/VERSION``), so the config is
reproducible and changes exactly when a new model is registered; a model folder that was
never registered is served from its path. Before writing, the stage loads the model and runs
one prediction, so a config that cannot serve is never published.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipelines.config import ParamsError, ServeParams, add_params_arguments, load_params
from pipelines.contracts import (
    APP_FIELDS,
    BUILDER,
    DEPLOYMENT,
    INGRESS,
    MODEL_FIX,
    MODEL_MAX_ONGOING,
    ModelMeta,
    check,
)
from pipelines.io import write_text
from pipelines.paths import DEPLOYED, FINETUNED, SERVE_CONFIG


def model_uri(p: ServeParams, finetuned: Path = FINETUNED) -> str:
    """The model to serve: ``serve.model``, or the finetuned model's registered version.

    Raises:
        ParamsError: nothing to serve (no ``serve.model`` and no finetuned model folder).
    """
    from gattn.models.io import CONFIG, read_config

    if p.model:
        return p.model if p.model.startswith("models:/") else str(Path(p.model).resolve())
    finetuned = Path(finetuned)
    try:
        cfg = read_config(finetuned)
    except FileNotFoundError as err:
        raise ParamsError(f"{err}; run `gattn finetune` or set serve.model") from None
    registered = check(ModelMeta, cfg, finetuned / CONFIG, MODEL_FIX).registered
    if registered:
        return f"models:/{registered.name}/{registered.version}"
    print(f"deploy: {finetuned} was not registered; serving the folder by its path")
    return str(Path(finetuned).resolve())


def registry_store(uri: str) -> str | None:
    """The tracking store the replicas resolve a ``models:/`` URI in: the project's (an
    absolute path, so a replica's working folder does not matter). ``None`` for a folder, or
    for a store URL with credentials in it (replicas then read ``$MLFLOW_TRACKING_URI``)."""
    from pipelines.tracking import tracking_uri

    if not uri.startswith("models:/"):
        return None
    store = tracking_uri()
    return None if "@" in urlsplit(store).netloc else store


def serve_config(p: ServeParams, model: str, store: str | None = None) -> dict[str, Any]:
    """The ``ServeDeploySchema`` dict (``serve build`` format) serving ``model``."""
    args: dict[str, Any] = {"model": model, **p.model_dump(mode="json", include=set(APP_FIELDS))}
    args["concurrent_batches"] = p.batches_in_flight
    if store:
        args["tracking_uri"] = store
    actor: dict[str, Any] = {"num_cpus": p.num_cpus}
    if p.num_gpus:
        actor["num_gpus"] = p.num_gpus
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": p.host, "port": p.port},
        "applications": [
            {
                "name": p.app_name,
                "route_prefix": p.route_prefix,
                "import_path": BUILDER,
                "args": args,
                "deployments": [
                    {
                        "name": INGRESS,
                        "num_replicas": p.ingress_replicas,
                        "max_ongoing_requests": p.max_ongoing_requests,
                        "ray_actor_options": {"num_cpus": p.ingress_num_cpus},
                    },
                    {
                        "name": DEPLOYMENT,
                        "num_replicas": p.num_replicas,
                        "max_ongoing_requests": MODEL_MAX_ONGOING,
                        "ray_actor_options": actor,
                    },
                ],
            }
        ],
    }


def smoke_test(model: str, store: str | None, p: ServeParams) -> dict[str, Any]:
    """Load the model as a replica would and predict one blank image; returns its info."""
    import torch

    from pipelines.registry import resolve_model
    from pipelines.serve.predictor import Job, Options, Predictor

    predictor = Predictor(resolve_model(model, store=store), p.overlap, p.tta_scales)
    blank = torch.zeros(predictor.spec.in_chans, *predictor.spec.img_size)
    (result,) = predictor.run([Job(blank, Options())])
    if isinstance(result, Exception):
        raise result
    return predictor.spec.info()


def deploy(p: ServeParams, finetuned: Path = FINETUNED, out_dir: Path = DEPLOYED) -> dict[str, Any]:
    """Write ``out_dir/serve_config.yaml`` for the model to serve; returns a summary.

    Raises:
        ParamsError: nothing to serve, or the config does not validate.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    uri = model_uri(p, finetuned)
    store = registry_store(uri)
    config = serve_config(p, uri, store)
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        raise ParamsError(f"serve config does not validate: {err}") from None
    info = smoke_test(uri, store, p)
    path = Path(out_dir) / SERVE_CONFIG.name
    header = "# Ray Serve config written by `gattn deploy` (serve build format). Run: gattn serve\n"
    write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    return {"config": str(path), "model": uri, **info}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("--model-dir", type=Path, default=FINETUNED, help="finetuned model")
    parser.add_argument("--out", type=Path, default=DEPLOYED, help="folder of serve_config.yaml")


def run(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import tracking

    params = load_params(args.params, args.overrides)
    with tracking.stage_run(
        "deploy", params.model_dump(include={"serve"}), params.tracking.experiment
    ):
        summary = deploy(params.serve, args.model_dir, args.out)
        mlflow.set_tag("gattn.served_model", summary["model"])
        mlflow.log_artifact(summary["config"], artifact_path="deploy")
    print(f"deploy: {json.dumps(summary)}")
    return 0
