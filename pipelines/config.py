"""``params.yaml``: one pydantic model per section, so a wrong key or value is a clear error.

Every stage reads its section through :func:`load_params`; errors name the file, the dotted key
and what is expected, e.g. ``params.yaml: data.image_size: Input should be greater than or
equal to 16 (got 4)``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class ParamsError(ValueError):
    """``params.yaml`` is missing, not YAML, or does not validate."""


def _format(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see params.yaml's sections)")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params FILE")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def set_override(data: dict[str, Any], assignment: str) -> None:
    """Apply ``key.sub=value`` (value parsed as YAML) to nested ``data`` in place."""
    if "=" not in assignment:
        raise ParamsError(f"override {assignment!r}: expected KEY=VALUE, e.g. data.image_size=64")
    key, raw = assignment.split("=", 1)
    *parents, leaf = key.strip().split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ParamsError(f"override {assignment!r}: {p!r} is not a section")
    node[leaf] = yaml.safe_load(raw)


def validate(model: type[BaseModel], data: dict[str, Any], path: Path) -> BaseModel:
    """Validate ``data`` against ``model``; raise :class:`ParamsError` with every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format(path, err)) from None


# ---------------------------------------------------------------------------------------------
# Sections. A stage reads only its own section (plus ``seed`` and ``tracking``).


class TrackingParams(Section):
    """MLflow: the experiment every stage logs to (store: ``$MLFLOW_TRACKING_URI`` or
    ``<project>/mlflow.db``) and the registered model name the finetune stage writes."""

    experiment: str = Field("gattn", min_length=1)
    model_name: str = Field("gattn-model", min_length=1)  # MLflow Model Registry name


class LargeImagesParams(Section):
    """Large generated test images for sliding-window evaluation (the cue is outside most
    windows). ``num_samples: 0`` disables them."""

    num_samples: int = Field(4, ge=0)
    image_size: int = Field(256, ge=16)


class DataParams(Section):
    """The ``prepare`` stage: which data, how many, how large, how split.

    ``task`` is a generated benchmark (``cue-seg``, ``pathfinder``) or your own images:
    ``folder-cls`` (ImageFolder layout) or ``folder-seg`` (``images/`` + ``masks/``) under
    ``root``.
    """

    task: Literal["cue-seg", "pathfinder", "folder-cls", "folder-seg"] = "cue-seg"
    root: str | None = None
    num_samples: int = Field(800, ge=3)
    image_size: int = Field(64, ge=16)
    num_classes: int | None = Field(None, ge=1)
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.15, gt=0, lt=1)
    generator: dict[str, Any] = Field(default_factory=dict)
    large: LargeImagesParams = LargeImagesParams()
    grid_samples: int = Field(16, ge=1, le=64)

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave room for a train split")
        if self.task.startswith("folder"):
            if not self.root:
                raise ValueError(f"task {self.task!r} reads your images: set data.root")
            if self.task == "folder-seg" and self.num_classes is None:
                raise ValueError("task 'folder-seg' needs data.num_classes (mask values < it)")
        return self


class MaeParams(Section):
    """MAE objective (``pretrain.method: mae``; the backbone must be a timm ViT)."""

    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = False
    decoder_dim: int = Field(64, ge=4, multiple_of=4)
    decoder_depth: int = Field(1, ge=1)
    decoder_heads: int = Field(4, ge=1)


class DinoParams(Section):
    """DINO objective (``pretrain.method: dino``): heads, multi-crop, teacher schedules."""

    out_dim: int = Field(1024, ge=2)
    hidden_dim: int = Field(256, ge=1)
    bottleneck_dim: int = Field(64, ge=1)
    n_local: int = Field(4, ge=0)
    local_size: int = Field(32, ge=8)
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    momentum: float = Field(0.996, ge=0, le=1)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: int = Field(0, ge=0)


class PretrainParams(Section):
    """The ``pretrain`` stage: self-supervised pretraining of an encoder on Ray Train.

    ``batch_size`` is per worker; ``lr`` is the peak learning rate after ``warmup_epochs``,
    decaying (cosine) to ``min_lr``. ``storage`` holds Ray's run folders (checkpoints); a run
    is named from a hash of this section and ``seed``, so a rerun of the same config resumes
    and a changed config starts afresh.
    """

    method: Literal["mae", "dino"] = "mae"
    backbone: str = Field("gattn_vit_global", min_length=1)
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    img_size: int = Field(64, ge=16)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    max_samples: int | None = Field(None, ge=1)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(2, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(1, ge=0)
    storage: str = Field("outputs/ray", min_length=1)
    mae: MaeParams = MaeParams()
    dino: DinoParams = DinoParams()

    @model_validator(mode="after")
    def _check(self) -> PretrainParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self


class Params(Section):
    """The whole ``params.yaml``."""

    seed: int = Field(0, ge=0)
    tracking: TrackingParams = TrackingParams()
    data: DataParams = DataParams()
    pretrain: PretrainParams = PretrainParams()


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read, override (``key.sub=value``) and validate ``params.yaml``.

    Raises:
        ParamsError: with every invalid key and value named.
    """
    path = Path(path)
    data = read_yaml(path)
    for assignment in overrides:
        set_override(data, assignment)
    return validate(Params, data, path)  # type: ignore[return-value]


def add_params_arguments(parser: argparse.ArgumentParser) -> None:
    """``--params FILE`` and ``--set KEY=VALUE`` for every stage command."""
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param, e.g. --set data.num_samples=200 (repeatable)",
    )
