"""``params.yaml``: one pydantic model per section, so a wrong key or value is a clear error.

Every stage reads its section through :func:`load_params`; errors name the file, the dotted key
and what is expected, e.g. ``params.yaml: data.image_size: Input should be greater than or
equal to 16 (got 4)``.
"""

from __future__ import annotations

import argparse
import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=True)


class ParamsError(ValueError):
    """``params.yaml`` is missing, not YAML, or does not validate."""


def _format(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (check the spelling; see params.yaml's sections)")
        elif isinstance(e.get("input"), dict) and (not loc or msg.startswith(f"{loc}.")):
            lines.append(f"  {msg}")  # a rule across keys whose message names its own key
        elif isinstance(e.get("input"), dict):  # a whole section: the message says what
            lines.append(f"  {loc}: {msg}")
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


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict[str, Any], path: Path) -> M:
    """Validate ``data`` against ``model``; raise :class:`ParamsError` with every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format(path, err)) from None


# ---------------------------------------------------------------------------------------------
# Sections. A stage reads only its own section (plus ``seed`` and ``tracking``).


Task = Literal["seg", "cls", "det"]  # what a task's targets are: masks, image labels, boxes
TASK_KINDS: dict[str, Task] = {
    "cue-seg": "seg",
    "pathfinder": "cls",
    "tiny-det": "det",
    "folder-cls": "cls",
    "folder-seg": "seg",
    "folder-det": "det",
    "torchvision-cls": "cls",
}
# The tasks of the models that tune, finetune, evaluate and serve handle (pipelines.contracts).
ModelTask = Literal["seg", "cls", "det"]
DET_RECIPE_PREFIX = "gattn_det_"  # a detection task's tune families name gattn.models recipes
GENERATED = ("cue-seg", "pathfinder", "tiny-det")  # data.task values whose images prepare generates
# ``torchvision.datasets`` classes with a standard train/test split that ``torchvision-cls``
# reads: the names of :data:`gattn.data.torchvision_sets.TRAIN_TEST` (a test keeps the two
# equal), spelt out so that loading params.yaml imports no torch.
TorchvisionSet = Literal[
    "MNIST",
    "FashionMNIST",
    "KMNIST",
    "QMNIST",
    "USPS",
    "CIFAR10",
    "CIFAR100",
    "SVHN",
    "STL10",
    "GTSRB",
    "Food101",
    "Flowers102",
    "DTD",
    "Country211",
    "RenderedSST2",
    "StanfordCars",
    "FGVCAircraft",
    "OxfordIIITPet",
    "Imagenette",
]


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

    ``task`` is a generated benchmark (``cue-seg``, ``pathfinder``, ``tiny-det``), your own
    images: ``folder-cls`` (ImageFolder layout), ``folder-seg`` (``images/`` + ``masks/``) or
    ``folder-det`` (``images/`` + COCO ``annotations.json``) under ``root`` (a local folder, or
    ``s3://bucket/prefix`` / ``gs://...``: object storage over fsspec,
    :func:`pipelines.data.data_path`), or ``torchvision-cls``: the ``torchvision.datasets``
    class named ``dataset``
    read from ``root`` in its own layout (``download``: fetch it there if missing), whose test
    part is the test split and whose train part gives the train and ``val_fraction`` val
    splits. ``num_samples`` is the number of generated samples, or for ``torchvision-cls`` at
    most that many images, drawn (seeded) from both parts in their ratio (``null``: all);
    your folders are used whole. ``num_classes`` (folder-seg) is read from the masks when
    ``null`` (the largest value other than 255, plus one); folder-det's classes are its COCO
    categories. ``image_size``, ``generator`` and ``large`` shape the generated benchmarks only:
    other images are used at their size (tiny-det's objects are 4-16 px whatever the size:
    128 is its intended size on a CPU, 64 leaves a few objects per image).
    """

    task: Literal[
        "cue-seg",
        "pathfinder",
        "tiny-det",
        "folder-cls",
        "folder-seg",
        "folder-det",
        "torchvision-cls",
    ] = "cue-seg"  # TASK_KINDS
    root: str | None = None
    dataset: TorchvisionSet | None = None
    download: bool = False
    num_samples: int | None = Field(800, ge=3)
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
        generated = self.task in GENERATED
        if not generated and not self.root:
            what = "a torchvision data set" if self.task == "torchvision-cls" else "your images"
            raise ValueError(f"task {self.task!r} reads {what}: set data.root")
        if generated and self.root:
            raise ValueError(
                f"data.root: task {self.task!r} generates its images and reads no folder; "
                "set data.task to folder-cls, folder-seg, folder-det or torchvision-cls to use "
                "other images (or root: null)"
            )
        if generated and self.num_samples is None:
            raise ValueError(
                f"data.num_samples: task {self.task!r} generates that many samples: set a "
                "number (null, all images, is for torchvision-cls)"
            )
        if self.generator and not generated:
            raise ValueError(
                f"data.generator: options of the generated tasks; task {self.task!r} "
                "generates nothing: use {}"
            )
        if self.task == "torchvision-cls" and self.root and "://" in self.root:
            raise ValueError(
                f"data.root: {self.root} is object storage, which the folder tasks read "
                "(folder-cls, folder-seg); torchvision-cls reads a local folder"
            )
        if self.task == "torchvision-cls" and self.dataset is None:
            raise ValueError(
                "data.dataset: task 'torchvision-cls' reads the torchvision data set of that "
                "name: set one, e.g. FashionMNIST"
            )
        if self.task != "torchvision-cls":
            for key in ("dataset", "download"):
                if getattr(self, key):
                    raise ValueError(
                        f"data.{key}: set for torchvision-cls only (task {self.task!r}); "
                        f"use {'null' if key == 'dataset' else 'false'}"
                    )
        if self.num_classes is not None and self.task != "folder-seg":
            raise ValueError(
                f"data.num_classes: set for folder-seg only (task {self.task!r} knows its "
                "classes: the generated ones, folder-cls's sub-folders, folder-det's COCO "
                "categories or the data set's); use null"
            )
        return self

    @property
    def kind(self) -> Task:
        """``seg``, ``cls`` or ``det``: what the task's targets are."""
        return TASK_KINDS[self.task]


class MaeParams(Section):
    """MAE objective (``pretrain.method: mae``; the backbone must be a timm ViT)."""

    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix_loss: bool = False
    decoder_dim: int = Field(64, ge=4, multiple_of=4)
    decoder_depth: int = Field(1, ge=1)
    decoder_heads: int = Field(4, ge=1)


class DinoParams(Section):
    """DINO objective (``pretrain.method: dino``): heads, multi-crop, teacher schedules.

    Caron et al. 2021 train for ~100k+ steps; a CPU run has a few hundred to a few thousand,
    so the defaults differ from the paper's where that matters (see params.yaml): a lower
    teacher EMA ``momentum`` (cosine to 1 over the run), fewer prototypes ``out_dim``,
    BatchNorm in the head (``use_bn``). ``freeze_last_layer`` and
    ``warmup_teacher_temp_epochs`` are in epochs (fractions allowed); ``weight_decay_end``
    (``null``: constant) is the end of a cosine from ``pretrain.weight_decay``, which DINO
    applies to weights only (not to biases and norms). ``local_size`` ``null`` is half the
    global crop (``pretrain.img_size``; DINO: 96 of 224).
    """

    out_dim: int = Field(256, ge=2)
    hidden_dim: int = Field(256, ge=1)
    bottleneck_dim: int = Field(64, ge=1)
    nlayers: int = Field(3, ge=1)
    use_bn: bool = True
    norm_last_layer: bool = True
    freeze_last_layer: float = Field(0.0, ge=0)
    n_local: int = Field(4, ge=0)
    local_size: int | None = Field(None, ge=8)  # None: half of pretrain.img_size
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.4)
    momentum: float = Field(0.99, ge=0, le=1)
    teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp: float = Field(0.04, gt=0)
    warmup_teacher_temp_epochs: float = Field(0, ge=0)
    student_temp: float = Field(0.1, gt=0)
    center_momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay_end: float | None = Field(None, ge=0)


class ProbeParams(Section):
    """Frozen-feature evaluation at the end of ``pretrain``: a weighted k-NN and a linear probe
    of the pretrained encoder and of the same encoder at its random initialisation.

    Image-level labels: a classification task's own; for segmentation, the most frequent
    non-background class of the mask (the cue class on ``cue-seg``); for detection, the most
    frequent box label of the image (0 without boxes). The probes are fitted on
    the train split (at most ``max_train`` images) and scored on ``split``. ``every_epoch``
    also scores the k-NN of the encoder being trained after every epoch (on rank 0): the curve
    of accuracy against pretraining epochs, in ``loss_curve.csv`` and ``knn_curve.png``.
    """

    enabled: bool = True
    every_epoch: bool = False
    k: int = Field(20, ge=1)  # neighbours of the k-NN vote
    temperature: float = Field(0.07, gt=0)  # k-NN vote weight exp(cosine / temperature)
    weight_decay: float = Field(1e-3, gt=0)  # linear probe L2 penalty
    split: Literal["val", "test"] = "val"
    max_train: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)


class PretrainParams(Section):
    """The ``pretrain`` stage: self-supervised pretraining of an encoder on Ray Train.

    ``batch_size`` is per worker; ``lr`` is the peak learning rate after ``warmup_epochs``,
    decaying (cosine) to ``min_lr``. ``storage`` holds Ray's run folders (checkpoints); a run
    is named from a hash of this section (less ``probe`` and ``log_every_n_steps``, which do not
    change training) and ``seed``, so a rerun of the same config resumes and a changed config
    starts afresh.
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
    log_every_n_steps: int = Field(5, ge=1)  # per-step metrics (loss, lr, DINO collapse stats)
    mae: MaeParams = MaeParams()
    dino: DinoParams = DinoParams()
    probe: ProbeParams = ProbeParams()

    @model_validator(mode="after")
    def _check(self) -> PretrainParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        if self.min_lr > self.lr:
            raise ValueError("min_lr must not exceed lr")
        return self


class ServeParams(Section):
    """The ``deploy`` stage and ``gattn serve``: the Ray Serve app, its limits and resources.

    ``model`` is a registry URI (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``) or a model
    folder; ``null`` serves the version the finetune stage registered (pinned, from
    ``models/finetuned/config.json``). ``auth_token_env`` names an environment variable that
    holds a bearer token (``null``: no auth); the token itself is never written to a file.
    """

    model: str | None = None
    app_name: str = Field("gattn", min_length=1)
    route_prefix: str = Field("/", pattern=r"^/")
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1)  # model replicas
    num_cpus: float = Field(1.0, gt=0)  # per model replica; also its torch threads (at least 1)
    num_gpus: float = Field(0.0, ge=0)  # per model replica
    ingress_replicas: int = Field(1, ge=1)  # HTTP replicas (decode, checks, batching)
    ingress_num_cpus: float = Field(1.0, gt=0)  # per ingress replica
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    concurrent_batches: int | None = Field(None, ge=1)  # in flight per ingress (None: 2/replica)
    max_ongoing_requests: int = Field(64, ge=1)  # per ingress replica
    max_body_bytes: int = Field(8 * 2**20, ge=1024)
    max_pixels: int = Field(2048 * 2048, ge=1)
    top_k: int = Field(5, ge=1)
    overlap: float = Field(0.25, ge=0, lt=1)  # sliding-window overlap, fraction of the window
    tta_scales: tuple[float, ...] = Field((0.75, 1.0, 1.25), min_length=1)
    auth_token_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")

    @model_validator(mode="after")
    def _check(self) -> ServeParams:
        if self.max_ongoing_requests < self.max_batch_size * self.batches_in_flight:
            raise ValueError(
                "max_ongoing_requests must be >= max_batch_size x concurrent_batches "
                "(or batches stay small)"
            )
        if any(s <= 0 for s in self.tta_scales):
            raise ValueError("tta_scales must be positive")
        return self

    @property
    def batches_in_flight(self) -> int:
        """Batches an ingress replica sends at once: ``concurrent_batches``, by default two per
        model replica (one computing while the next travels, so no replica waits)."""
        return self.concurrent_batches or 2 * self.num_replicas


# Initial weights (``finetune.init``, ``tune.families.<name>.init``; read by
# :mod:`pipelines.init_weights`). Checked here by form only: this module must not import torch.
INIT_SOURCES = ("scratch", "ssl", "hub")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # gattn.models.pretrained's too
_NAMED_WEIGHTS = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$")  # <timm model>.<tag>


def check_init(value: str, keywords: tuple[str, ...]) -> str:
    """``value`` if it is one of ``keywords``, a weights file path or a named weights file
    (``<model>.<tag>``, e.g. ``mobilenetv2_100.tv_in1k``; the name is checked when the
    stage reads it); else a ``ValueError`` that lists the choices."""
    if value == "pretrained":
        raise ValueError(
            "'pretrained' was renamed 'ssl' (the pretrain stage's encoder, models/pretrained); "
            "for ImageNet weights use 'hub' (timm's, needs the network or its cache) or a "
            "weights file / named file such as mobilenetv2_100.tv_in1k"
        )
    path_like = value.endswith(WEIGHT_SUFFIXES) or "/" in value
    if value in keywords or path_like or _NAMED_WEIGHTS.match(value):
        return value
    raise ValueError(
        f"expected {' | '.join(keywords)}, a weights file ({', '.join(WEIGHT_SUFFIXES)}) or a "
        "named weights file such as mobilenetv2_100.tv_in1k"
    )


class FinetuneParams(Section):
    """The ``finetune`` stage: supervised training of the config the search chose, on Ray Train.

    The model and its ``lr``/``batch_size`` come from ``models/tune/best.json`` at
    ``budget_gib`` (``null``: the search's ``selected_budget``); ``lr``/``batch_size`` here
    override them. ``init: trial`` starts from the weights the searched trial ended with
    (``best.json``'s entry ``weights``, every tensor), so the champion continues its trial;
    ``ssl`` (the pretrain stage's encoder, ``models/pretrained``), ``hub`` (timm's pretrained
    weights of the backbone, e.g. ImageNet), a weights file (``.safetensors``/``.pth``) or a
    named file (``mobilenetv2_100.tv_in1k``) are loaded by name where the shapes match
    (:mod:`pipelines.init_weights`); ``scratch`` loads nothing.
    ``layer_decay < 1`` scales each layer's learning rate by ``layer_decay ** (depth -
    layer)`` (embeddings least, the head fully). ``crop_scale`` is the area range of random
    crops (``[1, 1]``: whole images, as a cue anywhere must stay visible).
    Global-context feedback is learnt for detectors and segmenters whose head takes a context: a
    ``context_crop`` share of the batches become one window (a crop of ``context_crop_scale``
    of the area, resized back) while the context vector comes from the whole image, as in
    sliding-window inference with ``global_context="auto"``. ``search_tolerance``: the
    fine-tuned model is scored on the search's validation images as the search scored its
    trials; more than this below the trial it came from and the stage fails, registering and
    publishing nothing (``null``: no check). ``num_workers: 0`` runs Ray Train's local mode.
    """

    budget_gib: float | None = Field(None, gt=0)
    init: str = "trial"  # trial | ssl | hub | scratch | a weights file | a named file
    epochs: int = Field(12, ge=1)
    batch_size: int | None = Field(None, ge=1)  # per worker; null: best.json's
    lr: float | None = Field(None, gt=0)  # peak AdamW lr; null: best.json's
    min_lr_ratio: float = Field(0.01, ge=0, le=1)
    warmup_epochs: float = Field(0.5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    layer_decay: float = Field(1.0, gt=0, le=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)
    crop_scale: tuple[float, float] = (1.0, 1.0)
    hflip: bool = True
    balance_classes: bool = True  # CE weights 1/sqrt(class frequency), as in the search
    context_crop: float = Field(0.15, ge=0, le=1)
    context_crop_scale: tuple[float, float] = (0.06, 0.5)
    max_samples: int | None = Field(None, ge=1)  # first N training images (null: all)
    max_val_samples: int | None = Field(None, ge=1)
    search_tolerance: float | None = Field(0.0, ge=0)  # allowed shortfall vs the search's best
    num_workers: int = Field(1, ge=0)  # 0: Ray Train's local mode (this process, no DDP)
    cpus_per_worker: int = Field(2, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(1, ge=0)
    storage: str = Field("outputs/ray", min_length=1)

    @field_validator("init")
    @classmethod
    def _check_init(cls, value: str) -> str:
        return check_init(value, ("trial", *INIT_SOURCES))

    @model_validator(mode="after")
    def _check(self) -> FinetuneParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        for name in ("crop_scale", "context_crop_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high <= 1")
        return self


class EvaluateParams(Section):
    """The ``evaluate`` stage: the fine-tuned model on the test split (at its training size)
    and on the large images (sliding windows of the training size, with and without global
    feedback), each with and without test-time augmentation (``tta_scales`` + flip).

    ``overlap`` is the window overlap as a fraction of the window; ``erf_images`` test images
    give the effective receptive field. Test images run ``batch_size`` at a time, large images
    one at a time (their windows ``window_batch_size`` at a time); ``ms_per_image`` is the
    median wall time per image.
    """

    model: str | None = None  # models:/NAME@ALIAS, models:/NAME/N or a folder; null: finetune's
    batch_size: int = Field(16, ge=1)
    window_batch_size: int = Field(16, ge=1)
    overlap: float = Field(0.25, ge=0, lt=1)
    blend: Literal["gaussian", "constant"] = "gaussian"
    tta_scales: tuple[float, ...] = Field((0.75, 1.0, 1.25), min_length=1)
    tta_flip: bool = True
    max_samples: int | None = Field(None, ge=1)  # first N test images (null: all)
    erf_images: int = Field(8, ge=1)
    num_threads: int = Field(2, ge=1)  # torch threads of the stage

    @model_validator(mode="after")
    def _check(self) -> EvaluateParams:
        if any(s <= 0 for s in self.tta_scales):
            raise ValueError("tta_scales must be positive")
        return self


class FamilyParams(Section):
    """One backbone family of the ``tune`` search: a timm model or ``gattn_*`` recipe, its
    timm arguments, and the weights its trials start from (``init``): ``ssl`` (the pretrain
    stage's encoder, loaded only where ``backbone`` and its arguments are the encoder's: any
    other family starts from scratch), ``scratch``, ``hub`` (timm's pretrained weights of
    ``backbone``) or a weights file / named file (e.g. ``mobilenetv2_100.tv_in1k``), each
    loaded by name and shape (:mod:`pipelines.init_weights`)."""

    backbone: str = Field(min_length=1)
    backbone_kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str = "ssl"  # ssl | scratch | hub | a weights file | a named file

    @field_validator("init")
    @classmethod
    def _check_init(cls, value: str) -> str:
        return check_init(value, INIT_SOURCES)


_NO_LAYERSCALE = {"ls_init_value": None}  # trained briefly from scratch: no identity start
DEFAULT_FAMILIES: dict[str, dict[str, Any]] = {
    "cnn": {"backbone": "gattn_local_cnn", "init": "scratch"},
    "swin": {
        "backbone": "swin_tiny_patch4_window7_224",
        "backbone_kwargs": {
            "embed_dim": 32,
            "depths": [2, 2],
            "num_heads": [1, 2],
            "window_size": 4,
        },
        "init": "scratch",
    },
    "vit": {"backbone": "gattn_vit_global", "init": "ssl"},  # the pretrain stage's encoder
}
DEFAULT_MODULE_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "small": {
        "global_attn": {"num_heads": 2, **_NO_LAYERSCALE},
        "global_tokens": {"window_size": 4, "num_global_tokens": 2, **_NO_LAYERSCALE},
        "window_attn": {"window_size": 4, **_NO_LAYERSCALE},
        "nonlocal": {"sub_sample": 2},
        "large_kernel": {"kernel_size": 7},
        "ppm": {"pool_sizes": [1, 2]},
        "se": {"rd_ratio": 0.25},
    },
    "large": {
        "global_attn": {"num_heads": 4, **_NO_LAYERSCALE},
        "global_tokens": {"window_size": 8, "num_global_tokens": 8, **_NO_LAYERSCALE},
        "window_attn": {"window_size": 8, **_NO_LAYERSCALE},
        "nonlocal": {"sub_sample": 1},
        "large_kernel": {"kernel_size": 13},
        "ppm": {"pool_sizes": [1, 2, 3, 6]},
        "se": {"rd_ratio": 0.0625},
    },
}


class TuneParams(Section):
    """The ``tune`` stage: a memory-budgeted search over backbone families, global modules
    (which, where, how large, how many), resolution and training knobs (Ray Tune, Optuna TPE +
    ASHA).

    Each trial first estimates the peak memory of one training step at its ``batch_size`` and
    ``img_size``; a config over ``max(budgets_gib)`` is recorded as infeasible and never
    trained. The others train ``epochs`` short epochs (on ``max_train_samples`` images) and
    report quality on ``max_val_samples`` validation images, measured peak memory, images/s and
    parameters. ``module_sizes`` maps a size name to block options per module (a module absent
    from a size gets its defaults); ``attn_impls`` picks fused (``scaled_dot_product_attention``)
    or plain (materialised scores) attention for the attention blocks. ``select_budget`` is the
    budget whose best config the finetune stage trains (``null``: the largest budget with one).
    Each family's ``init`` says which weights its trials start from (:class:`FamilyParams`).
    """

    num_samples: int = Field(12, ge=1)
    budgets_gib: tuple[float, ...] = Field((0.025, 0.05, 0.1), min_length=1)
    select_budget: float | None = Field(None, gt=0)
    families: dict[str, FamilyParams] = Field(
        default_factory=lambda: {k: FamilyParams(**v) for k, v in DEFAULT_FAMILIES.items()},
        min_length=1,
    )
    modules: tuple[str, ...] = Field(
        ("none", "global_attn", "global_tokens", "window_attn", "nonlocal", "ppm", "se"),
        min_length=1,
    )
    module_sizes: dict[str, dict[str, dict[str, Any]]] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_MODULE_SIZES), min_length=1
    )
    attn_impls: tuple[Literal["fused", "plain"], ...] = Field(("fused", "plain"), min_length=1)
    positions: tuple[Literal["last", "second_last"], ...] = Field(
        ("last", "second_last"), min_length=1
    )
    num_blocks: tuple[int, ...] = Field((1, 2), min_length=1)
    heads: tuple[str, ...] = Field(("fcn", "psp"), min_length=1)  # segmentation only
    head_channels: int = Field(32, ge=1)
    batch_sizes: tuple[int, ...] = Field((8, 16, 32, 64), min_length=1)
    img_sizes: tuple[int, ...] = Field((48, 64), min_length=1)
    lr: tuple[float, float] = (1e-3, 1e-2)  # log-uniform range of the AdamW learning rate
    weight_decay: float = Field(0.05, ge=0)
    balance_classes: bool = True  # CE weights 1/sqrt(class frequency) in trials
    epochs: int = Field(4, ge=1)  # per trial; ASHA may stop a trial after grace_period
    warmup_epochs: float = Field(0.5, ge=0)  # linear warm-up, then cosine (finetune's recipe)
    min_lr_ratio: float = Field(0.01, ge=0, le=1)  # final lr = lr * min_lr_ratio
    max_train_samples: int | None = Field(None, ge=1)
    max_val_samples: int | None = Field(64, ge=1)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    max_concurrent: int = Field(2, ge=1)
    cpus_per_trial: int = Field(1, ge=1)  # also each trial's torch threads
    loader_workers: int = Field(0, ge=0)  # processes decoding a trial's batches (0: its own)
    time_budget_s: float | None = Field(240.0, gt=0)  # whole sweep; running trials then stop
    gpus_per_trial: float = Field(0.0, ge=0)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    storage: str = Field("outputs/ray", min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "pretrained" in data:
            raise ValueError(
                "tune.pretrained: removed; each family says where its trials start: "
                "tune.families.<name>.init: ssl (the pretrain stage's encoder, loaded where the "
                "family's backbone is the encoder's: what `pretrained: true` did) | scratch "
                "(`false`) | hub | a weights file; delete tune.pretrained"
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> TuneParams:
        if any(b <= 0 for b in self.budgets_gib):
            raise ValueError("budgets_gib must be positive (GiB)")
        if self.select_budget is not None and self.select_budget not in self.budgets_gib:
            raise ValueError(f"select_budget must be one of budgets_gib {self.budgets_gib}")
        if not 0 < self.lr[0] <= self.lr[1]:
            raise ValueError("lr must be a range (low, high) with 0 < low <= high")
        if min(self.num_blocks) < 1 or min(self.batch_sizes) < 1 or min(self.img_sizes) < 16:
            raise ValueError("num_blocks, batch_sizes must be >= 1 and img_sizes >= 16")
        choices = self.choices("seg")
        for i, point in enumerate(self.points_to_evaluate):
            where = f"tune.points_to_evaluate[{i}]"
            for key, value in point.items():
                if key == "lr":
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        raise ValueError(
                            f"{where}.lr: {value!r} is not a number (YAML reads 3e-3 as text: "
                            "write 0.003 or 3.0e-3)"
                        )
                    if not self.lr[0] <= value <= self.lr[1]:
                        raise ValueError(
                            f"{where}.lr: {value!r} is outside the tune.lr range "
                            f"{list(self.lr)} (widen tune.lr or pick a value in it)"
                        )
                    continue
                if key not in choices:
                    raise ValueError(
                        f"{where}: unknown key {key!r}; keys: {', '.join(choices)}, lr"
                    )
                if value not in choices[key]:
                    raise ValueError(
                        f"{where}.{key}: {value!r} is not in tune.{key}s {list(choices[key])} "
                        "(add it there or pick one of them)"
                    )
        if self.grace_period > self.epochs:
            raise ValueError(
                f"tune.grace_period: {self.grace_period} epochs before ASHA may stop a trial, "
                f"but a trial trains tune.epochs={self.epochs}; set tune.grace_period <= "
                "tune.epochs (e.g. --set tune.grace_period=1 with --set tune.epochs=1)"
            )
        return self

    def choices(self, kind: Task) -> dict[str, list[Any]]:
        """The categorical knobs of the search for a task ``kind`` and their values, in the
        order the search space lists them. The search also samples ``lr`` (log-uniform in
        :attr:`lr`); ``head`` is a segmentation knob only. A detection search chooses among
        the families (each a detector recipe, :meth:`det_families_error`, which fixes the FPN's
        finest level and its global modules), batch sizes and resolutions only."""
        if kind == "det":
            return {
                "family": sorted(self.families),
                "batch_size": list(self.batch_sizes),
                "img_size": list(self.img_sizes),
            }
        choices: dict[str, list[Any]] = {
            "family": sorted(self.families),
            "module": list(self.modules),
            "module_size": sorted(self.module_sizes),
            "attn_impl": list(self.attn_impls),
            "position": list(self.positions),
            "num_blocks": list(self.num_blocks),
            "batch_size": list(self.batch_sizes),
            "img_size": list(self.img_sizes),
        }
        if kind == "seg":
            choices["head"] = list(self.heads)
        return choices

    def points(self, kind: Task) -> list[dict[str, Any]]:
        """``points_to_evaluate`` for a task ``kind``: each point without the keys its search
        space lacks (``head`` for classification), so one default serves every task."""
        keys = {*self.choices(kind), "lr"}
        return [{k: v for k, v in point.items() if k in keys} for point in self.points_to_evaluate]

    def det_families_error(self, kind: Task) -> str | None:
        """Why the families do not fit a task ``kind``, or None: a detection search's families
        are detector recipes (``gattn_det_*``, :func:`gattn.models.detector_recipes`), the
        other tasks' are backbones."""
        for name, family in sorted(self.families.items()):
            if (kind == "det") != family.backbone.startswith(DET_RECIPE_PREFIX):
                wanted = (
                    "a detector recipe (gattn_det_p3, gattn_det_p2, gattn_det_p2_ppm_lk, "
                    "gattn_det_p2_tokens)"
                    if kind == "det"
                    else "a backbone, not a detector recipe"
                )
                return (
                    f"tune.families.{name}.backbone: {family.backbone!r} for a {kind!r} task; "
                    f"set {wanted} (see params-tiny-det.yaml)"
                )
        return None

    def missing_in_points(self, kind: Task) -> str | None:
        """Why a point does not fix every knob of the ``kind`` search (which Ray's searcher
        requires), or None."""
        keys = [*self.choices(kind), "lr"]
        for i, point in enumerate(self.points_to_evaluate):
            missing = [k for k in keys if k not in point]
            if missing:
                return (
                    f"tune.points_to_evaluate[{i}]: missing key(s) {missing}: a point fixes "
                    f"every knob of the search ({', '.join(keys)}); copy the first point of "
                    "the project's params.yaml and change what you want, or use []"
                )
        return None


class Params(Section):
    """The whole ``params.yaml``."""

    seed: int = Field(0, ge=0)
    tracking: TrackingParams = TrackingParams()
    data: DataParams = DataParams()
    pretrain: PretrainParams = PretrainParams()
    tune: TuneParams = TuneParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    serve: ServeParams = ServeParams()

    @model_validator(mode="after")
    def _check(self) -> Params:
        missing = self.tune.missing_in_points(self.data.kind)
        if missing:
            raise ValueError(f"{missing} (data.task {self.data.task!r})")
        return self


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> Params:
    """Read, override (``key.sub=value``) and validate ``params.yaml``.

    Raises:
        ParamsError: with every invalid key and value named.
    """
    path = Path(path)
    data = read_yaml(path)
    for assignment in overrides:
        set_override(data, assignment)
    return validate(Params, data, path)


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
