"""``finetune`` stage: supervised training of the searched config from pretrained weights.

Transfer as in BEiT/MAE fine-tuning (Bao et al. 2022, "BEiT: BERT Pre-Training of Image
Transformers", layer-wise learning-rate decay; He et al. 2022, "Masked Autoencoders Are
Scalable Vision Learners", Sec. 4): the model the search chose (``models/tune/best.json``) is
built and, by default (``init: trial``), starts from the weights the searched trial ended with
(``best.json``'s entry ``weights``, written by the tune stage), every tensor loaded strictly,
so the champion continues its trial rather than repeating it from scratch. Otherwise it starts
from ``init`` (:mod:`pipelines.init_weights`): ``ssl`` (``models/pretrained/
encoder.safetensors``), ``hub`` (timm's pretrained weights, e.g. ImageNet), a weights file or
a named one (``mobilenetv2_100.tv_in1k``), or ``scratch``: every tensor whose name (after the
encoder's prefix, e.g. ``encoder.model.`` inside a :class:`~gattn.models.Segmenter`) and shape
match is loaded, and the rest is reported (missing / unexpected / shape-mismatched keys; an
absolute position embedding of another grid is resampled). Training runs data-parallel with a
Ray Train V2 ``TorchTrainer`` (DDP, gloo on CPU / NCCL on GPU), AdamW with warm-up + cosine
and optional layer-wise decay, one checkpoint per epoch (safetensors weights + a
``weights_only`` state; a worker failure or a rerun of the same config resumes), and keeps
the weights of the epoch with the best validation metric (mIoU for segmentation, accuracy for
classification, COCO box mAP for detection: the detector's own loss, boxes flipped and cropped
with their images, :func:`gattn.data.views.det_train_transform`).

Global-context feedback is trained, not only used: for a segmenter whose head takes a context
vector, and for a detector, a share of the batches (``context_crop``) become one random window
of the image (masks or boxes cut with it), resized to the input size, while the context comes
from the whole image (what :func:`gattn.inference.sliding_window` with
``global_context="auto"`` and :func:`gattn.inference.sliding_window_detect` give each window
of a large image). The context projection starts at zero, so without this it would stay an
unused no-op.

Reads ``seed``, ``tracking``, ``finetune`` from params.yaml, ``models/tune/best.json`` (and,
for ``init: trial``, the trial's weights beside it), ``models/pretrained/`` and
``data/prepared/``. Writes

- ``models/finetuned/``: a :func:`gattn.models.save_model` folder whose meta is a
  :class:`pipelines.contracts.ModelMeta`, also registered in the MLflow Model Registry under
  ``tracking.model_name`` with alias ``champion``;
- ``reports/finetune/``: ``metrics.json``, ``history.csv`` (per epoch: train loss, validation
  metric) and ``init.json`` (the ``init`` and which of its keys were loaded).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from gattn.data import IGNORE_INDEX, collate_detection
from gattn.data.views import det_train_transform, seg_eval_transform, seg_train_transform
from gattn.models import Detector, Segmenter, build_model, save_model
from gattn.models.fcos import Target
from gattn.models.io import CONFIG, cpu_state_dict, read_config
from gattn.models.pretrained import LoadReport
from gattn.models.recipes import resolve_recipe
from gattn.models.weight_files import sha256
from pipelines.config import FinetuneParams, ParamsError, Task, add_params_arguments, load_params
from pipelines.contracts import (
    BEST_FIX,
    BestEntry,
    BestFile,
    ContractError,
    ModelMeta,
    read_file,
)
from pipelines.data import (
    Split,
    data_fingerprint,
    held_split,
    native_size,
    open_split,
    read_splits,
    stream,
    subset,
)
from pipelines.init_weights import (
    apply_init,
    init_file,
    init_fingerprint,
    init_kind,
    resolve_init,
)
from pipelines.io import publish_dir, staging_dir, write_csv, write_json
from pipelines.metrics import METRIC, class_counts, class_weights, score, score_resized
from pipelines.paths import BEST_JSON, FINETUNE_REPORTS, FINETUNED, PREPARED, PRETRAINED
from pipelines.train.loop import HISTORY, Hooks, train, unwrap
from pipelines.train.trainer import fit_torch_trainer

BEST = "best.safetensors"  # in a checkpoint: the weights of the best epoch so far
_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|stages|layer)\.?(\d+)(?:\.|$)")
_EMBED = re.compile(r"(?:^|\.)(?:patch_embed|pos_embed|cls_token|reg_token|stem|conv1|bn1)(?:\.|$)")


# --------------------------------------------------------------------------------------------
# The searched config


def load_best(path: Path, budget_gib: float | None = None) -> tuple[BestFile, str, BestEntry]:
    """``best.json``, and the budget key and entry at ``budget_gib`` (default: selected).

    Raises:
        ContractError: no ``best.json``, or not one the tune stage writes.
        ParamsError: the budget is not in the file, or no config fits it.
    """
    best = read_file(BestFile, path, BEST_FIX)
    per_budget = best.per_budget
    if budget_gib is None:
        if best.selected_budget is None:
            raise ParamsError(f"{path}: the search found no config within any budget")
        key = best.selected_budget
    else:
        keys = [k for k in per_budget if math.isclose(float(k), budget_gib)]
        if not keys:
            raise ParamsError(
                f"finetune.budget_gib: {budget_gib} is not a searched budget; "
                f"{path} has {sorted(per_budget, key=float)}"
            )
        key = keys[0]
    entry = per_budget.get(key)
    if entry is None:
        raise ParamsError(
            f"finetune.budget_gib: no searched config fits {key} GiB ({path}); pick another "
            f"budget ({sorted((k for k, v in per_budget.items() if v), key=float)})"
        )
    return best, key, entry


class WorseThanSearchError(RuntimeError):
    """The fine-tuned model scores below the search's best trial on the trial's images."""


def compare_with_search(
    model: nn.Module,
    best: BestFile,
    entry: BestEntry,
    prepared: Path,
    task: Task,
    num_classes: int,
    size: int,
) -> dict[str, Any]:
    """Score ``model`` as the search scored the trial it came from: the same images (the first
    ``best.measured_on.images`` of the split), metric and resolution
    (:func:`pipelines.metrics.score_resized`); older ``best.json`` files without
    ``measured_on`` are compared on the whole validation split."""
    on = best.measured_on
    images = held_split(prepared, on.split, on.images, on.size or native_size(prepared)).open()
    ours = score_resized(model, stream(images), task, size, num_classes)[METRIC[task]]
    search = float(entry.quality)
    return {
        "search_quality": search,
        "search_split_score": float(ours),
        "gain_over_search": float(ours) - search,
        "search_split_images": len(images),
    }


def check_against_search(comparison: Mapping[str, Any], tolerance: float | None) -> None:
    """Raise :class:`WorseThanSearchError` when the fine-tuned model scores more than
    ``tolerance`` below the search's trial (``None``: no check)."""
    if tolerance is None or comparison["gain_over_search"] >= -tolerance:
        return
    raise WorseThanSearchError(
        f"finetune: the fine-tuned model scores {comparison['search_split_score']:.4f} on the "
        f"search's {comparison['search_split_images']} validation images, below the search's "
        f"best trial ({comparison['search_quality']:.4f}) by more than "
        f"finetune.search_tolerance={tolerance}, so it is neither registered nor published "
        "(reports/finetune/ has its history). Train it longer (finetune.epochs), check the "
        "learning rate (finetune.lr), or raise finetune.search_tolerance (null: no check)."
    )


# --------------------------------------------------------------------------------------------
# Initial weights


def initialise(
    model: nn.Module, cfg: Mapping[str, Any], init: str, encoder: Path | None
) -> LoadReport:
    """Load the weights ``init`` names (``ssl``: the ``encoder`` folder; ``hub``; a file;
    ``scratch``: none) into ``model`` (config ``cfg``) where names and shapes match
    (:func:`pipelines.init_weights.apply_init`, as the tune stage's trials start)."""
    backbone = str(resolve_recipe(cfg)["backbone"])  # a detector recipe's backbone
    initial = resolve_init(init, backbone, encoder, require_encoder=True)
    return apply_init(model, cfg, initial)


TRIAL_FIX = (
    "rerun `gattn tune` (it keeps the best trials' weights) or set finetune.init: ssl, hub, "
    "a weights file or scratch"
)


def trial_weights(best_json: Path, entry: BestEntry) -> Path:
    """The weights file of ``entry`` (``best.json``'s ``weights``, relative to its folder).

    Raises:
        ContractError: the entry has no weights (a ``best.json`` written before the search
            kept them, or a trial that never checkpointed), or the file is missing.
    """
    if entry.weights is None:
        raise ContractError(
            f"{best_json}: the entry of trial {entry.trial} has no weights, so finetune.init: "
            f"trial cannot start from it; {TRIAL_FIX}"
        )
    path = Path(best_json).parent / entry.weights
    if not path.is_file():
        raise ContractError(f"{path}: not found (weights of {best_json}'s trial); {TRIAL_FIX}")
    return path


def load_trial(model: nn.Module, path: Path) -> LoadReport:
    """Load the trial's weights file ``path`` into ``model``: every tensor, same names and
    shapes (safetensors, no pickle).

    Raises:
        ContractError: the file does not hold exactly ``model``'s tensors.
    """
    weights = load_file(str(path))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ContractError(
            f"{path}: not the weights of the searched model ({err}); {TRIAL_FIX}"
        ) from None
    return LoadReport(matched=sorted(weights))


def initial_weights(model: nn.Module, config: Mapping[str, Any]) -> LoadReport:
    """Initialise ``model`` as the loop ``config`` says: the trial's weights
    (``trial_weights``), else its ``init`` (:func:`initialise`)."""
    if config.get("trial_weights"):
        return load_trial(model, Path(config["trial_weights"]))
    encoder = config.get("pretrained")
    return initialise(model, config["model"], config["init"], encoder and Path(encoder))


# --------------------------------------------------------------------------------------------
# Optimisation


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a parameter for layer-wise decay: 0 for embeddings/stem, ``i + 1`` inside
    block/stage ``i``, ``num_layers + 1`` for everything after (norms, heads)."""
    found = _LAYER.search(name)
    if found:
        return int(found[1]) + 1
    return 0 if _EMBED.search(name) else num_layers + 1


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embeddings (1-d or ``*_embed``/
    ``*_token``), and ``lr_scale = layer_decay ** (num_layers + 1 - layer_id)``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depths = [int(m[1]) + 1 for n, _ in named if (m := _LAYER.search(n))]
    num_layers = max(depths, default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named:
        lid = layer_id(name, num_layers)
        no_decay = param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        group = groups.setdefault(
            (lid, no_decay),
            {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (num_layers + 1 - lid),
            },
        )
        group["params"].append(param)
    return list(groups.values())


def train_transform(p: FinetuneParams, img_size: int, task: Task = "seg") -> Any:
    """Random crop (``crop_scale``) resized to ``img_size``, optional flip; joint for masks
    and (``task`` ``det``) boxes."""
    view = det_train_transform if task == "det" else seg_train_transform
    return view(img_size, scale=p.crop_scale, hflip=p.hflip)


# The validation figures of an epoch besides ``val_metric`` (:data:`pipelines.metrics.METRIC`)
VAL_FIGURES: dict[Task, tuple[str, ...]] = {
    "seg": ("accuracy", "miou"),
    "cls": ("accuracy", "miou"),
    "det": ("map_50", "map_small"),
}


def takes_context(model: nn.Module) -> bool:
    """Whether ``model`` fuses a ``global_context`` vector: a segmenter whose head has a
    context projection, or a detector (its own projection)."""
    head = getattr(model, "head", None)
    return callable(getattr(model, "encode_context", None)) and (
        getattr(head, "context_proj", None) is not None
        or getattr(model, "context_proj", None) is not None
    )


def _window(
    shape: tuple[int, int], scale: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """A random square-ish window ``(x, y, w, h)`` of ``scale`` of the area of ``shape``."""
    H, W = shape
    side = float(torch.empty(1).uniform_(*scale, generator=generator)) ** 0.5
    h, w = max(1, round(H * side)), max(1, round(W * side))
    y = int(torch.randint(0, H - h + 1, (1,), generator=generator))
    x = int(torch.randint(0, W - w + 1, (1,), generator=generator))
    return x, y, w, h


def window_view(
    images: torch.Tensor,
    targets: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random square-ish crop (area fraction in ``scale``) of a whole batch, resized back
    to the batch's size (images bilinear, masks nearest): what a sliding window sees of a
    larger image of the same scene."""
    H, W = images.shape[-2:]
    x, y, w, h = _window((H, W), scale, generator)
    crop = F.interpolate(
        images[..., y : y + h, x : x + w], size=(H, W), mode="bilinear", align_corners=False
    )
    mask = targets[:, None, y : y + h, x : x + w].float()
    mask = F.interpolate(mask, size=(H, W), mode="nearest")[:, 0].long()
    return crop, mask


def window_view_boxes(
    images: torch.Tensor,
    targets: list[Target],
    scale: tuple[float, float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, list[Target]]:
    """:func:`window_view` for detection targets: the boxes shifted into the window, clipped
    to it and scaled with it; those left under 1 px wide or high are dropped with their labels
    (the rule of :func:`gattn.data.views.det_train_transform`)."""
    H, W = images.shape[-2:]
    x, y, w, h = _window((H, W), scale, generator)
    crop = F.interpolate(
        images[..., y : y + h, x : x + w], size=(H, W), mode="bilinear", align_corners=False
    )
    shift = torch.tensor([x, y, x, y], dtype=torch.float32)
    limit = torch.tensor([w, h, w, h], dtype=torch.float32)
    factor = torch.tensor([W / w, H / h, W / w, H / h], dtype=torch.float32)
    views: list[Target] = []
    for t in targets:
        boxes = t["boxes"].float()
        inside = (boxes - shift.to(boxes.device)).clamp(min=0).minimum(limit.to(boxes.device))
        boxes = inside * factor.to(boxes.device)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        views.append({**t, "boxes": boxes[keep], "labels": t["labels"][keep]})
    return crop, views


class FinetuneHooks(Hooks):
    """The finetune stage in the shared Ray Train loop (:func:`pipelines.train.loop.train`):
    the searched model from its initial weights (``init``), class-balanced cross-entropy (a
    detector: its own loss, :meth:`gattn.models.Detector.loss`, on batches whose targets stay
    lists), layer-wise learning-rate decay, the global-feedback windows (``context_crop``), and
    at the end of each epoch the validation score (a detector's: mAP), keeping the weights of
    the best epoch so far."""

    stage = "finetune"
    loss_name = "train_loss"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.p = p = FinetuneParams.model_validate(config["params"])
        self.peak_lr, self.min_lr_ratio = config["lr"], p.min_lr_ratio
        self.warmup_epochs, self.epochs, self.grad_clip = p.warmup_epochs, p.epochs, p.grad_clip
        self.task, self.num_classes = config["task"], config["num_classes"]
        self.history = []
        self.best: dict[str, torch.Tensor] = {}  # weights of the best epoch so far (CPU)
        self.weight: torch.Tensor | None = None

    def build(self) -> tuple[nn.Module, Split, int]:
        p, config, size = self.p, self.config, self.config["img_size"]
        model = build_model(config["model"])
        initial_weights(model, config)
        prepared = Path(config["prepared"])
        view = train_transform(p, size, self.task)
        train = subset(open_split("train", prepared, view), p.max_samples)
        self.val = subset(open_split("val", prepared, seg_eval_transform(size)), p.max_val_samples)
        self.collate_fn = collate_detection if self.task == "det" else None
        # The all-background answer must not be the cheapest one (a detector's loss takes no
        # class weights: its focal loss balances the classes itself).
        if p.balance_classes and self.task != "det":
            counts = torch.zeros(self.num_classes, dtype=torch.long)
            for i in range(len(train)):  # one sample at a time: memory flat in the split's size
                counts += class_counts(torch.as_tensor(train[i][1]), self.num_classes)
            self.weight = class_weights(counts)
        self.use_context = p.context_crop > 0 and self.task != "cls" and takes_context(model)
        self.generator = torch.Generator().manual_seed(config["seed"] * 1000 + self.rank)
        return model, train, config["batch_size"]

    def resume(self, folder: Path, state: dict[str, Any]) -> None:
        self.best = load_file(str(folder / BEST))

    def ddp_kwargs(self) -> dict[str, Any]:
        # Batches without context leave the context projection unused: DDP must allow that.
        return {"find_unused_parameters": self.use_context}

    def on_device(self) -> None:
        self.weight = None if self.weight is None else self.weight.to(self.device)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return param_groups(model, self.p.weight_decay, self.p.layer_decay)

    def loss(
        self, model: nn.Module, batch: Any, epoch: int, i: int
    ) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
        images, targets = batch
        p = self.p
        if self.task == "det":
            detector = unwrap(model)
            assert isinstance(detector, Detector)  # build_model of a det config
            if self.use_context and float(torch.rand(1, generator=self.generator)) < p.context_crop:
                # Global feedback: the detector sees a window, the context the whole image.
                context = detector.encode_context(images)
                images, targets = window_view_boxes(
                    images, targets, p.context_crop_scale, self.generator
                )
                outputs = model(images, global_context=context)
            else:
                outputs = model(images)
            return detector.loss(outputs, targets)["loss"], len(images), []
        if self.use_context and float(torch.rand(1, generator=self.generator)) < p.context_crop:
            # Global feedback: the head sees a window, the context the whole image.
            segmenter = unwrap(model)
            assert isinstance(segmenter, Segmenter)  # use_context: takes_context(model)
            context = segmenter.encode_context(images)
            images, targets = window_view(images, targets, p.context_crop_scale, self.generator)
            logits = model(images, global_context=context)
        else:
            logits = model(images)
        loss = F.cross_entropy(
            logits.float(),
            targets,
            weight=self.weight,
            ignore_index=IGNORE_INDEX,
            label_smoothing=p.label_smoothing,
        )
        return loss, len(images), []

    def end_epoch(self, model: nn.Module, row: dict[str, Any]) -> None:
        scores = self.validation_scores(model)
        row["val_metric"] = scores[METRIC[self.task]]
        row.update({f"val_{k}": scores[k] for k in VAL_FIGURES[self.task]})
        previous = max((h["val_metric"] for h in self.history), default=-math.inf)
        if not self.best or row["val_metric"] >= previous:  # ties: the later epoch
            self.best = cpu_state_dict(model)
        self.history.append(row)

    def validation_scores(self, model: nn.Module) -> dict[str, Any]:
        """The scores of ``model`` (left in eval mode) on the validation images."""
        model.eval()
        loader = DataLoader(
            self.val, batch_size=self.config["batch_size"], collate_fn=self.collate_fn
        )
        if self.task == "det":  # held at the training size: boxes as predicted
            return score_resized(model, loader, "det", self.config["img_size"], self.num_classes)
        return score(model, loader, self.task, self.num_classes, self.device)

    def save(self, model: nn.Module, folder: Path) -> dict[str, Any]:
        save_file(self.best, str(folder / BEST))
        return {}


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of the stage (:class:`FinetuneHooks` in the shared loop)."""
    hooks = FinetuneHooks(config)
    train(hooks, hooks.p.cpus_per_worker)


# --------------------------------------------------------------------------------------------
# The stage


def run_name(p: FinetuneParams, seed: int, entry: BestEntry, data: str, init: str) -> str:
    """``finetune-<hash>`` of the section, seed, searched entry, data and initial weights."""
    searched = entry.model_dump(mode="json", exclude_unset=True)  # as best.json holds it
    blob = json.dumps(
        {
            "p": p.model_dump(mode="json"),
            "seed": seed,
            "entry": searched,
            "data": data,
            "init": init,
        },
        sort_keys=True,
    )
    return f"finetune-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def model_config(entry: BestEntry, num_classes: int, img_size: int) -> dict[str, Any]:
    """The searched ``build_model`` config, checked against the data's classes."""
    cfg = dict(entry.model)
    if int(cfg.get("num_classes", num_classes)) != num_classes:
        raise ParamsError(
            f"best.json's model has num_classes={cfg['num_classes']} but the prepared data has "
            f"{num_classes} classes; rerun `gattn tune` on this data"
        )
    cfg["num_classes"] = num_classes
    if "img_size" in cfg:
        cfg["img_size"] = img_size
    return cfg


def loop_config(
    p: FinetuneParams,
    seed: int,
    entry: BestEntry,
    pretrained: Path,
    prepared: Path,
    fail_at_epoch: int | None = None,
    trial_file: Path | None = None,
) -> dict[str, Any]:
    """The workers' config (:class:`FinetuneHooks`): the searched model checked against the
    data, the recipe, the initial weights (``trial_file``: the trial's, for ``init: trial``;
    see :func:`trial_weights`; else ``p.init``, a file made absolute), and the Ray run's
    ``run_name`` and ``storage`` (the name hashes the initial weights).

    Raises:
        ParamsError: the searched model is for another task or number of classes, or
            ``init: trial`` without ``trial_file``.
        FileNotFoundError: ``init: ssl`` without a pretrained encoder, or a missing weights
            file (or the package of a named one).
        gattn.models.pretrained.HubUnavailableError: ``init: hub`` offline (not cached).
    """
    info = read_splits(prepared)
    task: Task = info["kind"]
    if entry.model.get("task", "cls") != task:
        raise ParamsError(
            f"best.json's model is for task {entry.model.get('task')!r}, data is {task!r}"
        )
    init = p.init
    if init == "trial":
        if trial_file is None:
            raise ParamsError(f"finetune.init: trial needs the trial's weights; {TRIAL_FIX}")
        trial_file = Path(trial_file).resolve()
        init_hash = f"trial-{sha256(trial_file)}"
    else:
        if init_kind(init) == "file":  # the workers read the file by its absolute path
            init = str(init_file(init))
        backbone = str(resolve_recipe(entry.model)["backbone"])
        init_hash = init_fingerprint(init, backbone, Path(pretrained))
    name = run_name(p, seed, entry, data_fingerprint(prepared), init_hash)
    storage = Path(p.storage).resolve()
    return {
        "params": p.model_dump(mode="json"),
        "seed": seed,
        "model": model_config(entry, len(info["classes"]), entry.img_size),
        "task": task,
        "classes": list(info["classes"]),
        "num_classes": len(info["classes"]),
        "img_size": entry.img_size,
        "lr": p.lr or entry.train.lr,
        "batch_size": p.batch_size or entry.train.batch_size,
        "init": init,
        "pretrained": str(Path(pretrained).resolve()) if init == "ssl" else None,
        "trial_weights": str(trial_file) if init == "trial" else None,
        "prepared": str(Path(prepared).resolve()),
        "fail_at_epoch": fail_at_epoch,
        "fail_flag": str(storage / f"{name}.injected-failure"),
        "run_name": name,
        "storage": str(storage),
    }


def best_model(
    result: Any, config: dict[str, Any]
) -> tuple[nn.Module, list[dict[str, Any]], LoadReport]:
    """The model with the best epoch's weights from the run's last checkpoint, the run's
    history, and the report of its initialisation (:func:`initial_weights`)."""
    model = build_model(config["model"])
    init = initial_weights(model, config)
    with result.checkpoint.as_directory() as d:
        history = json.loads((Path(d) / HISTORY).read_text())
        model.load_state_dict(load_file(str(Path(d) / BEST)))
    return model, history, init


def history_columns(task: Task) -> list[str]:
    """The columns of ``history.csv`` for a task: its validation figures between the loss
    and the learning rate."""
    figures = [f"val_{k}" for k in VAL_FIGURES[task]]
    return ["epoch", "train_loss", "val_metric", *figures, "lr", "images_per_s"]


def write_reports(
    reports_dir: Path,
    p: FinetuneParams,
    history: list[dict[str, Any]],
    init: dict[str, Any],
    metrics: dict[str, Any],
    task: Task,
) -> None:
    """``history.csv`` (:func:`history_columns` of ``task``), ``init.json`` and
    ``metrics.json`` under ``reports_dir``."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    columns = history_columns(task)
    rows = [{c: h[c] for c in columns} for h in history]
    write_csv(reports_dir / "history.csv", rows, columns)
    write_json(reports_dir / "init.json", {"init": p.init, **init})
    write_json(reports_dir / "metrics.json", metrics)


def stage_metrics(
    meta: ModelMeta,
    history: list[dict[str, Any]],
    init: dict[str, Any],
    wall: float,
    comparison: dict[str, Any],
) -> dict[str, Any]:
    """The stage's ``metrics.json``: the chosen epoch, the training figures, how much of the
    pretrained encoder was loaded, and the comparison with the search's trial."""
    final = history[-1]
    return {
        "metric": meta.metric,
        "best_score": meta.best_score,
        "best_epoch": meta.best_epoch,
        "epochs": int(final["epoch"]),
        "final_train_loss": float(final["train_loss"]),
        "first_train_loss": float(history[0]["train_loss"]),
        "images_per_s": float(final["images_per_s"]),
        "resumed_from_epoch": int(final["start_epoch"]),
        "pretrained_matched": len(init["matched"]),
        "pretrained_missing": len(init["missing"]),
        "pretrained_unexpected": len(init["unexpected"]),
        "pretrained_shape_mismatch": len(init["shape_mismatch"]),
        "budget_gib": meta.budget_gib,
        "wall_s": wall,
        **comparison,
    }


def model_meta(
    config: dict[str, Any], history: list[dict[str, Any]], budget: str, entry: BestEntry
) -> ModelMeta:
    """The model folder's meta: task, classes, input size, and the best epoch of ``history``
    (ties: the first) with its validation score, the budget and the searched trial."""
    task = config["task"]
    best_row = max(history, key=lambda h: h["val_metric"])
    return ModelMeta(
        task=task,
        classes=config["classes"],
        img_size=config["img_size"],
        metric=METRIC[task],
        best_score=float(best_row["val_metric"]),
        best_epoch=int(best_row["epoch"]),
        budget_gib=float(budget),
        trial=entry.trial,
        run_name=config["run_name"],
    )


def register_model(work: Path, model_name: str) -> dict[str, Any]:
    """Register the model folder ``work`` under ``model_name`` (alias ``champion``) and record
    the version in its meta. The stage does this last, so a failed stage registers nothing."""
    from pipelines.registry import register

    registered = {"name": model_name, "version": register(work, model_name)}
    write_json(work / CONFIG, {**read_config(work), "registered": registered})
    return registered


def finetune(
    p: FinetuneParams,
    seed: int = 0,
    best_json: Path = BEST_JSON,
    pretrained: Path = PRETRAINED,
    prepared: Path = PREPARED,
    out_dir: Path = FINETUNED,
    reports_dir: Path = FINETUNE_REPORTS,
    model_name: str | None = None,
    fail_at_epoch: int | None = None,
) -> dict[str, Any]:
    """Run the stage; returns ``{"metrics", "history", "init", "run_name", "registered"}``.

    Args:
        p: The ``finetune`` section.
        seed: The global seed.
        best_json: The search's result (``models/tune/best.json``).
        pretrained: The pretrain stage's folder (``encoder.safetensors``); used when
            ``p.init == "ssl"`` (``"trial"``: the entry's ``weights`` beside
            ``best_json``).
        prepared: The prepare stage's output folder.
        out_dir: The model folder to write.
        reports_dir: Where metrics, history and the init report go.
        model_name: Register the model under this name with alias ``champion`` in the
            current MLflow store (``None``: do not register).
        fail_at_epoch: Fault injection for tests (see
            :func:`pipelines.stages.pretrain.pretrain`).
    """
    best, budget, entry = load_best(best_json, p.budget_gib)
    trial_file = trial_weights(best_json, entry) if p.init == "trial" else None
    config = loop_config(p, seed, entry, pretrained, Path(prepared), fail_at_epoch, trial_file)
    name, storage = config["run_name"], Path(config["storage"])
    storage.mkdir(parents=True, exist_ok=True)
    result, wall = fit_torch_trainer(train_loop, config, p, name, storage)

    model, history, report = best_model(result, config)
    task, size = config["task"], config["img_size"]
    comparison = compare_with_search(
        model, best, entry, Path(prepared), task, config["num_classes"], size
    )
    meta = model_meta(config, history, budget, entry)
    work = staging_dir(Path(out_dir))
    save_model(model, config["model"], work, **meta.model_dump(mode="json", exclude={"registered"}))
    init = report.to_dict()
    metrics = stage_metrics(meta, history, init, wall, comparison)
    write_reports(Path(reports_dir), p, history, init, metrics, task)
    check_against_search(comparison, p.search_tolerance)
    registered = register_model(work, model_name) if model_name else None  # last
    publish_dir(work, Path(out_dir))
    return {
        "metrics": metrics,
        "history": history,
        "init": init,
        "run_name": name,
        "registered": registered,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("--best", type=Path, default=BEST_JSON, help="the search's best.json")
    parser.add_argument(
        "--pretrained", type=Path, default=PRETRAINED, help="pretrained encoder folder"
    )
    parser.add_argument("--data", type=Path, default=PREPARED, help="prepared data folder")
    parser.add_argument("--out", type=Path, default=FINETUNED, help="model folder to write")
    parser.add_argument(
        "--reports", type=Path, default=FINETUNE_REPORTS, help="report folder to write"
    )


def run(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import tracking

    params = load_params(args.params, args.overrides)
    with tracking.stage_run(
        "finetune", params.model_dump(include={"seed", "finetune"}), params.tracking.experiment
    ):
        out = finetune(
            params.finetune,
            params.seed,
            args.best,
            args.pretrained,
            args.data,
            args.out,
            args.reports,
            model_name=params.tracking.model_name,
        )
        for row in out["history"]:
            mlflow.log_metrics(
                {
                    f"epoch_{k}": float(v)
                    for k, v in row.items()
                    if k not in ("epoch", "start_epoch") and isinstance(v, int | float)
                },
                step=int(row["epoch"]),
            )
        mlflow.log_metrics({k: float(v) for k, v in out["metrics"].items() if k != "metric"})
        mlflow.set_tags(
            {
                "gattn.ray_run": out["run_name"],
                "gattn.metric": out["metrics"]["metric"],
                "gattn.registered_version": str(out["registered"]["version"]),
            }
        )
        mlflow.log_artifacts(str(args.reports), artifact_path="finetune")
    print(f"finetune: {json.dumps(out['metrics'])}")
    return 0
