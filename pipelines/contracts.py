"""The files one stage writes and another reads, as pydantic models: a typed contract each.

- ``models/tune/best.json`` (tune -> finetune, recommend): :class:`BestFile`, the best
  searched config per memory budget (:class:`BestEntry`) and the images the search scored on;
- a fine-tuned model folder's ``config.json`` (finetune -> evaluate, deploy, serve, explain):
  :class:`ModelMeta`, what a consumer needs beside the network's own ``model`` config;
- ``models/deploy/serve_config.yaml`` (deploy -> serve): a Ray Serve ``ServeDeploySchema``
  whose application ``args`` are :data:`AppArgs` and whose deployments are named
  :data:`INGRESS` and :data:`DEPLOYMENT`.

The writer builds the model and writes its dump, so what it writes validates; the reader
validates with :func:`read_file` (or :func:`check`), which raises :class:`ContractError` naming
the file, the key and how to make the file again, and which the command line prints without a
traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.config import ModelTask, ParamsError, Section, ServeParams


class ContractError(ParamsError):
    """A file a stage reads is missing or is not what the stage that writes it writes."""


class Contract(BaseModel):
    """Base of the files stages exchange: validated when read, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


C = TypeVar("C", bound=BaseModel)


def check(model: type[C], data: Any, path: Path | str, fix: str) -> C:
    """``data`` (read from ``path``) validated as ``model``.

    Raises:
        ContractError: every invalid key, named, and ``fix`` (how to write the file again).
    """
    try:
        return model.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in err.errors()
        )
        raise ContractError(f"{path}: not a valid {model.__name__} ({problems}); {fix}") from None


def read_file(model: type[C], path: Path, fix: str, parse: Callable[[str], Any] = json.loads) -> C:
    """The file ``path`` parsed (JSON; ``parse=yaml.safe_load`` for YAML) and validated as
    ``model`` (see :func:`check`).

    Raises:
        ContractError: the file is missing, does not parse, or does not validate.
    """
    path = Path(path)
    if not path.is_file():
        raise ContractError(f"{path}: not found; {fix}")
    try:
        data = parse(path.read_text())
    except Exception as err:  # the parser's own error (JSONDecodeError, YAMLError, ...)
        raise ContractError(f"{path}: does not parse ({err}); {fix}") from None
    return check(model, data, path, fix)


# ---------------------------------------------------------------------------------------------
# best.json: tune -> finetune, recommend


class TrainRecipe(Contract):
    """How the search trained a config (the finetune stage starts from its lr and batch)."""

    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    img_size: int | None = Field(None, ge=1)
    weight_decay: float | None = Field(None, ge=0)
    epochs: int | None = Field(None, ge=1)


class BestEntry(Contract):
    """One trained trial of the search: its model config, recipe and figures, and ``weights``:
    the trial's weights after its last reported epoch (safetensors, a path relative to
    ``best.json``'s folder; ``None`` in files written before the search kept them)."""

    trial: str | None = None
    summary: str | None = None
    model: dict[str, Any]
    train: TrainRecipe
    quality: float
    metric: str | None = None
    peak_memory_gib: float | None = None
    estimated_memory_gib: float | None = None
    images_per_s: float | None = None
    params: int | None = None
    weights: str | None = None

    @property
    def img_size(self) -> int:
        """The training input size: the recipe's, else the model config's."""
        return int(self.train.img_size or self.model["img_size"])


class MeasuredOn(Contract):
    """The images every trial's ``quality`` was scored on: the first ``images`` of ``split``
    at ``size`` px (``None``: the whole split, at the data's own size)."""

    split: Literal["train", "val", "test"] = "val"
    images: int | None = Field(None, ge=1)
    size: int | None = Field(None, ge=1)
    metric: str | None = None


class BestFile(Contract):
    """``models/tune/best.json``: the best trained config per budget (``None`` where none
    fits) and the budget the finetune stage trains by default."""

    task: ModelTask
    measured_on: MeasuredOn = MeasuredOn()
    budgets_gib: list[float]
    per_budget: dict[str, BestEntry | None]
    selected_budget: str | None = None


BEST_FIX = "rerun `gattn tune` (or pass --best)"


# ---------------------------------------------------------------------------------------------
# The fine-tuned model's meta: finetune -> evaluate, deploy, serve


class Registered(Contract):
    """Where the MLflow Model Registry holds a model folder."""

    name: str
    version: int


class ModelMeta(Contract):
    """What a model folder's ``config.json`` says beside the network's ``model`` config.

    ``task``, ``classes`` and ``img_size`` are what evaluating and serving need; the finetune
    stage also records how the model was chosen, and ``registered`` once it is registered.
    Other keys of ``config.json`` (``model``, ``mean``/``std``) belong to
    :mod:`gattn.models.io` and pass through.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    task: ModelTask
    classes: list[str] = Field(min_length=1)
    img_size: int = Field(ge=1)
    metric: str | None = None
    best_score: float | None = None
    best_epoch: int | None = None
    budget_gib: float | None = None
    trial: str | None = None
    run_name: str | None = None
    registered: Registered | None = None


MODEL_FIX = "rerun `gattn finetune` (or point at a folder it wrote)"


# ---------------------------------------------------------------------------------------------
# The serve config: deploy -> serve

INGRESS = "GattnIngress"  # HTTP, input checks, decoding, dynamic batching
DEPLOYMENT = "GattnModel"  # the model replicas: serve.num_replicas x (num_cpus, num_gpus)
MODEL_MAX_ONGOING = 8  # batches queued per model replica
BUILDER = "pipelines.serve.app:build_app"  # import path of the app builder (serve build format)
APP_FIELDS = (  # ServeParams fields that are app args (the rest: deployment options)
    "max_batch_size",
    "batch_wait_timeout_s",
    "concurrent_batches",
    "max_body_bytes",
    "max_pixels",
    "top_k",
    "overlap",
    "tta_scales",
    "auth_token_env",
)


def _serve_field(name: str) -> Any:
    """The ``serve`` section's field ``name`` (its default and checks), for :class:`AppArgs`."""
    return ServeParams.model_fields[name]


class AppArgs(Section):
    """The app's arguments (``args`` of the serve config): the model, where the registry
    lives, and the request-level settings of :class:`ServeParams` (:data:`APP_FIELDS`: same
    names, types, defaults and checks)."""

    model: str
    tracking_uri: str | None = None
    max_batch_size: int = _serve_field("max_batch_size")
    batch_wait_timeout_s: float = _serve_field("batch_wait_timeout_s")
    concurrent_batches: int | None = _serve_field("concurrent_batches")
    max_body_bytes: int = _serve_field("max_body_bytes")
    max_pixels: int = _serve_field("max_pixels")
    top_k: int = _serve_field("top_k")
    overlap: float = _serve_field("overlap")
    tta_scales: tuple[float, ...] = _serve_field("tta_scales")
    auth_token_env: str | None = _serve_field("auth_token_env")


SERVE_FIX = "rerun `gattn deploy` (or pass --config)"
