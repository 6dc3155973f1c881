"""The Ray Serve app (``gattn serve``): predictions, explanations and model info over HTTP.

Two deployments (Ray Serve model composition): ``GattnIngress``, a FastAPI app that checks,
decodes and preprocesses requests and batches them, and ``GattnModel``, the model replicas
(``serve.num_replicas`` x ``num_cpus``/``num_gpus``), called once per batch. Keeping HTTP work
out of the model's process leaves its cores (and its GIL) to the forward passes, and lets the
two scale apart (CPU ingress replicas in front of GPU model replicas).

The HTTP API (OpenAPI at ``/docs``):

- ``POST /v1/predict``: an image (raw body with ``Content-Type: image/...`` or a
  ``multipart/form-data`` upload in a ``file`` field). Classifiers answer the top-k labels
  with probabilities; segmenters the mask as a base64 palette PNG (pixel value = class id)
  and each class's area; detectors the boxes (``[x0, y0, x1, y1]`` in the image's pixels),
  each with its class index, label and score, by score. Query options: ``top_k``, ``tta``,
  ``sliding`` (``auto``: sliding windows with global feedback for images larger than the
  model's input), ``min_score`` (detectors).
- ``POST /v1/explain``: a heatmap PNG over the image (attention rollout for ViTs, Grad-CAM
  otherwise, for a detector of its top detection's class score; ``method`` and ``target``
  choose).
- ``GET /v1/model``: name, registry version, task, classes, input size, limits.
- ``GET /healthz``: liveness (no auth).

Dynamic batching: concurrent predictions are queued by ``@serve.batch`` in the ingress and run
together, up to ``max_batch_size`` requests or after ``batch_wait_timeout_s``, with up to
``concurrent_batches`` batches in flight (two per model replica: one computes while the next
travels) (adaptive batching as in
Clipper, Crankshaw et al. 2017, "Clipper: A Low-Latency Online Prediction Serving System",
NSDI); same-sized requests of a batch are one forward pass
(:meth:`pipelines.serve.predictor.Predictor.run`), and each response says how many requests its
batch held (``batch_size``). Bad input is a 4xx JSON error (:mod:`pipelines.serve.http_io`);
optional bearer-token auth reads the token from the environment variable named by
``auth_token_env`` in the ingress replicas' environment.

The model is a registry URI (``models:/NAME@champion``) or a model folder, resolved by
:func:`pipelines.registry.resolve_model` in each model replica. ``gattn serve`` runs the config the
``deploy`` stage wrote (``models/deploy/serve_config.yaml``) on a local Ray bound to
127.0.0.1, until Ctrl-C or SIGTERM: requests in flight are answered (new ones get 503; each
ingress replica's :meth:`GattnIngress.drain`), then Serve and Ray shut down.
"""

# No `from __future__ import annotations`: Serve and FastAPI read the endpoints' annotations.
import asyncio
import contextlib
import functools
import hmac
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve

from pipelines.contracts import DEPLOYMENT, INGRESS, MODEL_MAX_ONGOING, AppArgs
from pipelines.serve.http_io import (
    FORMATS,
    UPLOAD_FIELD,
    InputError,
    decode_image,
    heatmap_png,
    image_bytes,
    mask_png,
    read_body,
)
from pipelines.serve.predictor import Boxes, InputSpec, Job, Method, Options, Predictor

_ALIAS = re.compile(r"^models:/[^/@]+@(?P<alias>[^/@]+)$")

# --------------------------------------------------------------------------------------------
# Response schemas (for /docs and clients).


class ModelRef(BaseModel):
    name: str
    version: int | None = None
    alias: str | None = None
    source: str


class TopK(BaseModel):
    index: int
    label: str
    probability: float


class ClassArea(BaseModel):
    index: int
    label: str
    pixels: int
    fraction: float


class Box(BaseModel):
    box: list[float]  # [x0, y0, x1, y1], pixels of the uploaded image
    index: int
    label: str
    score: float


class PredictResponse(BaseModel):
    model: ModelRef
    task: Literal["cls", "seg", "det"]
    width: int
    height: int
    tta: bool
    sliding_window: bool
    batch_size: int  # requests in the dynamic batch this one ran in
    top_k: list[TopK] | None = None
    mask_png: str | None = None  # base64 palette PNG, pixel value = class index
    areas: list[ClassArea] | None = None
    boxes: list[Box] | None = None  # by score


class ExplainResponse(BaseModel):
    model: ModelRef
    method: Literal["rollout", "grad_cam"]
    target: int
    label: str
    width: int
    height: int
    heatmap_png: str  # base64 PNG: the heatmap over the image


class ModelInfo(BaseModel):
    model: ModelRef
    task: Literal["cls", "seg", "det"]
    classes: list[str]
    input_size: list[int]
    in_chans: int
    fixed_input_size: bool
    global_feedback: bool
    limits: dict[str, Any]


class ErrorResponse(BaseModel):
    error: str
    detail: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "empty, corrupt or truncated image",
        401: "missing or wrong bearer token",
        413: "body or image too large",
        415: "content type or image format not accepted",
        422: "invalid query parameter",
        503: "the server is shutting down",
    }.items()
}
_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                    "required": [UPLOAD_FIELD],
                }
            },
            **{
                f"image/{fmt.lower()}": {"schema": {"type": "string", "format": "binary"}}
                for fmt in FORMATS
            },
        },
    }
}

api = FastAPI(
    title="gattn",
    summary="Global-context vision models: predictions, explanations, model info.",
    version="1",
)


@api.exception_handler(InputError)
async def _input_error(_request: Request, err: InputError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.payload(), status_code=err.status, headers=headers)


@api.exception_handler(RequestValidationError)
async def _invalid_parameter(_request: Request, err: RequestValidationError) -> JSONResponse:
    detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": "invalid_parameter", "detail": detail}, status_code=422)


def model_ref(uri: str, config: dict[str, Any]) -> dict[str, Any]:
    """Name, registry version and alias of a served model (``config.json``'s ``registered``
    entry, written by the registry; a plain folder is named after itself)."""
    registered = config.get("registered") or {}
    alias = _ALIAS.match(uri)
    return {
        "name": registered.get("name") or Path(uri).name,
        "version": registered.get("version"),
        "alias": alias["alias"] if alias else None,
        "source": uri,
    }


def top_labels(probs: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, most probable first (ties by class index)."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"index": int(i), "label": classes[i], "probability": float(probs[i])} for i in order]


def mask_payload(mask: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """A segmentation answer: the mask as a base64 palette PNG and each class's area."""
    counts = np.bincount(mask.ravel(), minlength=len(classes)).tolist()
    return {
        "mask_png": mask_png(mask, len(classes)),
        "areas": [
            {"index": i, "label": c, "pixels": n, "fraction": n / mask.size}
            for i, (c, n) in enumerate(zip(classes, counts, strict=True))
        ],
    }


def box_payload(found: Boxes, classes: list[str], min_score: float) -> list[dict[str, Any]]:
    """A detection answer: the boxes scoring at least ``min_score``, by score, each with its
    class index and label."""
    keep = found["scores"] >= min_score
    boxes, labels, scores = (found[k][keep] for k in ("boxes", "labels", "scores"))
    return [
        {"box": box.tolist(), "index": int(k), "label": classes[int(k)], "score": float(s)}
        for box, k, s in zip(boxes, labels, scores, strict=True)
    ]


def read_token(env_name: str | None) -> str | None:
    """The bearer token from ``$env_name`` (``None``: no auth).

    Raises:
        RuntimeError: auth is asked for but the variable is unset or empty (never serve
            unauthenticated by mistake).
    """
    if env_name is None:
        return None
    token = os.environ.get(env_name, "")
    if not token:
        raise RuntimeError(
            f"auth_token_env={env_name!r} but ${env_name} is not set in the replica's "
            "environment; export it before Ray starts (or set serve.auth_token_env: null)"
        )
    return token


@serve.deployment(name=DEPLOYMENT, max_ongoing_requests=MODEL_MAX_ONGOING)
class GattnModel:
    """A model replica: a :class:`~pipelines.serve.predictor.Predictor` running whole batches.

    Only :class:`GattnIngress` calls it, once per dynamic batch, so the model's process spends
    its time in forward passes, not in HTTP parsing and image decoding (which would compete
    with them for the GIL), and model replicas (CPU or GPU) scale apart from the ingress.

    Args:
        args: :data:`AppArgs` as a dict (the serve config's ``args``).
    """

    def __init__(self, args: dict[str, Any]) -> None:
        import ray
        import torch

        from pipelines.registry import resolve_model

        checked = AppArgs.model_validate(args)
        resources = ray.get_runtime_context().get_assigned_resources()
        torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
        device = "cuda" if resources.get("GPU") and torch.cuda.is_available() else "cpu"
        folder = resolve_model(checked.model, store=checked.tracking_uri)
        self.predictor = Predictor(folder, checked.overlap, checked.tta_scales, device)
        self.ref = model_ref(checked.model, self.predictor.config)
        self.lock = threading.Lock()  # one model call at a time (explain hooks the model)

    def describe(self) -> tuple[InputSpec, dict[str, Any]]:
        """What the ingress needs: the model's input spec and its name/version."""
        return self.predictor.spec, self.ref

    def run(self, jobs: list[Job]) -> list[Any]:
        """One batch (:meth:`Predictor.run`); a group's error comes back as its result."""
        with self.lock:
            return self.predictor.run(jobs)

    def explain(
        self, image: Any, method: Method, target: int | None
    ) -> tuple[str, np.ndarray, int] | ValueError:
        """:meth:`Predictor.explain`; a method that does not apply comes back as the error."""
        with self.lock:
            try:
                return self.predictor.explain(image, method, target)
            except ValueError as err:
                return err


def counted(
    endpoint: Callable[..., Awaitable[dict[str, Any]]],
) -> Callable[..., Awaitable[dict[str, Any]]]:
    """An ingress endpoint that counts as in flight while it runs, and answers 503 once the
    replica drains (:meth:`GattnIngress.drain`). FastAPI reads the wrapped signature."""

    @functools.wraps(endpoint)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        async with self._in_flight():
            return await endpoint(self, *args, **kwargs)

    return wrapper


@serve.deployment(name=INGRESS, max_ongoing_requests=64)
@serve.ingress(api)
class GattnIngress:
    """The HTTP API: checks, decodes and preprocesses requests, batches them dynamically and
    sends each batch to a :class:`GattnModel` replica in one call.

    Args:
        model: The handle of the app's :class:`GattnModel` deployment.
        args: :data:`AppArgs` as a dict (the serve config's ``args``).
    """

    async def __init__(self, model: Any, args: dict[str, Any]) -> None:  # type: ignore[misc]  # Ray Serve awaits an async constructor
        import torch

        torch.set_num_threads(1)  # preprocessing only
        self.args = AppArgs.model_validate(args)
        self.model = model
        self.token = read_token(self.args.auth_token_env)
        self.in_flight = 0  # requests between arrival and answer (they may call the model)
        self.draining = False
        self.spec, self.ref = await model.describe.remote()
        self.predict_batch = serve.batch(
            max_batch_size=self.args.max_batch_size,
            batch_wait_timeout_s=self.args.batch_wait_timeout_s,
            max_concurrent_batches=self.args.concurrent_batches or 2,
        )(self._run_batch)

    @contextlib.asynccontextmanager
    async def _in_flight(self) -> AsyncIterator[None]:
        if self.draining:
            raise InputError(503, "shutting_down", "the server is shutting down; retry later")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def drain(self, timeout_s: float) -> int:
        """Refuse new predictions and explanations (503) and wait up to ``timeout_s`` until
        those in flight are answered; the number still running.

        Called by ``gattn serve`` before ``serve.shutdown``
        (:func:`pipelines.serve.runner.drain`): Serve stops an app's deployments together,
        and a request still in this replica (decoding, or waiting for its batch) would then
        find no model replica to run on and hang until it is killed.
        """
        self.draining = True
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(0.2)  # held a moment, so concurrent drain calls spread over replicas
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise InputError(401, "unauthorized", "send 'Authorization: Bearer <token>'")

    def _decode(self, data: bytes) -> tuple[Any, Any]:
        image = decode_image(data, self.args.max_pixels, self.spec.mode)
        return image, self.spec.preprocess(image)

    async def _image(self, request: Request) -> tuple[Any, Any]:
        """The checked upload: the decoded PIL image and the model's input tensor."""
        self._authorize(request)
        body = await read_body(request.headers, request.stream(), self.args.max_body_bytes)
        data = await image_bytes(request.headers, body)
        return await asyncio.to_thread(self._decode, data)  # off the event loop

    async def _run_batch(self, jobs: list[Job]) -> list[tuple[Any, int]]:
        """Run a dynamic batch on a model replica; each result comes back with the batch's
        size."""
        results = await self.model.run.remote(jobs)
        return [(r, len(jobs)) for r in results]

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the replica has its model loaded."""
        return {"status": "ok"}

    @api.get("/v1/model", response_model=ModelInfo, responses=_ERRORS)
    async def model_info(self, request: Request) -> dict[str, Any]:
        """The served model: name, registry version, task, classes, input size, limits."""
        self._authorize(request)
        limits = self.args.model_dump(include={"max_body_bytes", "max_pixels", "max_batch_size"})
        return {"model": self.ref, **self.spec.info(), "limits": limits}

    @api.post(
        "/v1/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY
    )
    @counted
    async def predict(
        self,
        request: Request,
        top_k: int | None = Query(None, ge=1, description="labels returned (cls)"),
        tta: bool = Query(False, description="test-time augmentation: scales and flips"),
        sliding: Literal["auto", "on", "off"] = Query(
            "auto",
            description="sliding windows (seg, det): auto = when larger than the input size",
        ),
        min_score: float = Query(0.0, ge=0, le=1, description="boxes from this score (det)"),
    ) -> dict[str, Any]:
        """Classify, segment or detect objects in an uploaded image."""
        image, x = await self._image(request)
        spec = self.spec
        options = Options(tta=tta, sliding=sliding)
        result, batch_size = await self.predict_batch(Job(x.numpy(), options))
        if isinstance(result, Exception):
            raise result
        width, height = image.size
        out: dict[str, Any] = {
            "model": self.ref,
            "task": spec.task,
            "width": width,
            "height": height,
            "tta": tta,
            "sliding_window": spec.task != "cls" and spec.use_sliding((height, width), options),
            "batch_size": batch_size,
        }
        if spec.task == "cls":
            k = min(top_k or self.args.top_k, len(result))
            out["top_k"] = top_labels(result, list(spec.classes), k)
        elif spec.task == "det":
            out["boxes"] = box_payload(result, list(spec.classes), min_score)
        else:
            out.update(await asyncio.to_thread(mask_payload, result, list(spec.classes)))
        return out

    @api.post(
        "/v1/explain", response_model=ExplainResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY
    )
    @counted
    async def explain(
        self,
        request: Request,
        method: Literal["auto", "rollout", "grad_cam"] = Query(
            "auto", description="auto: rollout for transformers, Grad-CAM otherwise"
        ),
        target: int | None = Query(None, ge=0, description="class to explain (default: predicted)"),
    ) -> dict[str, Any]:
        """A heatmap of what the model looks at, over the uploaded image."""
        image, x = await self._image(request)
        spec = self.spec
        if target is not None and target >= spec.num_classes:
            raise InputError(422, "invalid_parameter", f"target must be < {spec.num_classes}")
        answer = await self.model.explain.remote(x.numpy(), method, target)
        if isinstance(answer, ValueError):  # the method does not apply to this model
            raise InputError(422, "unsupported_method", str(answer))
        used, heat, target = answer
        width, height = image.size
        return {
            "model": self.ref,
            "method": used,
            "target": target,
            "label": spec.classes[target],
            "width": width,
            "height": height,
            "heatmap_png": await asyncio.to_thread(heatmap_png, image, heat),
        }


def build_app(
    args: dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None
) -> serve.Application:
    """The app builder named by the serve config's ``import_path``.

    Args:
        args: :data:`~pipelines.contracts.AppArgs`: ``model`` (a ``models:/`` URI or a
            folder) and the settings.
        deployments: Options of each deployment by name (``num_replicas``,
            ``ray_actor_options``, ...): the serve config's ``deployments``, which Serve
            applies itself when it deploys a config (``serve deploy``, KubeRay) and
            ``gattn serve`` hands over here.

    Raises:
        ValueError: invalid args (named, as in params.yaml errors).
    """
    from pydantic import ValidationError

    try:
        checked = AppArgs.model_validate(args)
    except ValidationError as err:
        raise ValueError(f"serve app args: {err}") from None
    app_args = checked.model_dump(mode="json")
    options = deployments or {}
    model = deployment(GattnModel).options(**options.get(DEPLOYMENT, {})).bind(app_args)
    return deployment(GattnIngress).options(**options.get(INGRESS, {})).bind(model, app_args)


def deployment(cls: object) -> serve.Deployment:
    """A ``@serve.deployment`` class as what it is at runtime, a :class:`serve.Deployment`
    (mypy keeps a class's own type through class decorators: python/mypy#3135)."""
    if not isinstance(cls, serve.Deployment):
        raise TypeError(f"{cls!r} is not a Ray Serve deployment")
    return cls
