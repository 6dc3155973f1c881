"""``pretrain`` stage: self-supervised pretraining of an encoder (MAE or DINO) on Ray Train.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022; Caron et al.,
"Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021. The objectives live in
:mod:`gattn.ssl`; this module runs them data-parallel with a Ray Train V2 ``TorchTrainer``
(DDP, gloo on CPU / NCCL on GPU, a distributed sampler, AdamW with a warm-up + cosine learning
rate, gradient clipping, bf16 autocast on CUDA only).

Fault tolerance: every epoch ends with a checkpoint (weights as safetensors, optimizer,
scheduler and epoch as a ``torch.save`` dict loaded with ``weights_only=True``); a worker
failure (``FailureConfig``) or a rerun of the same config resumes from the last one (a rerun
of a finished run trains no further and exports it again). The Ray run is named from a hash of
``pretrain``, ``seed`` and the prepared data's splits and manifest, so a changed config or
data set never resumes an old run (a code change alone does: clear ``pretrain.storage``).

Reads ``seed``, ``tracking`` and ``pretrain`` from params.yaml and ``data/prepared``. Writes

- ``models/pretrained/``: ``encoder.safetensors`` and ``config.json`` (its ``model`` entry
  rebuilds the encoder with :func:`gattn.models.build_model`);
- ``reports/pretrain/``: ``metrics.json`` (loss, images/s and the probe accuracies of the
  pretrained and of the randomly initialised encoder, :mod:`gattn.ssl.probe`),
  ``loss_curve.csv`` (per epoch), ``curves.png`` (per-step loss and learning rate) and
  ``objective.png`` (MAE: reconstructions of validation images; DINO: the teacher entropy and
  KL-to-mean collapse diagnostics per step).

MLflow gets the params, per-step metrics (``step_*``, every ``log_every_n_steps`` steps),
per-epoch metrics (``epoch_*``), the final metrics, the figures and the encoder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from gattn.data.views import MultiCropViews, mae_view, to_float
from gattn.models.build import build_model
from gattn.models.pretrained import ENCODER_WEIGHTS
from gattn.ssl import DINO, DINOLoss, MaskedAutoencoder, reconstruction_figure
from gattn.ssl.curves import curves_figure, dino_collapse_references
from gattn.ssl.dino import dino_param_groups, momentum_schedule
from gattn.ssl.probe import extract_features, image_labels, knn_predict, probe_accuracies
from gattn.ssl.schedules import warmup_cosine
from pipelines.config import PretrainParams, add_params_arguments, load_params
from pipelines.data import (
    Split,
    data_fingerprint,
    open_split,
    read_splits,
    subset,
)
from pipelines.io import publish_dir, staging_dir, write_csv, write_json
from pipelines.paths import PREPARED, PRETRAIN_REPORTS, PRETRAINED
from pipelines.train.loop import (
    HISTORY,
    WEIGHTS,
    Hooks,
    means,
    run_epoch,
    train,
    unwrap,
    warmup_cosine_scheduler,
)
from pipelines.train.trainer import fit_torch_trainer, mean_over_workers

ENCODER = ENCODER_WEIGHTS
CHECKPOINT_FORMAT = 2  # part of the run name: a new checkpoint layout never resumes an old one
NOT_TRAINING = {"probe", "log_every_n_steps"}  # params that leave the run name alone
STEP_STATS = ("teacher_entropy", "teacher_kl_to_mean")  # DINO's per-step collapse diagnostics


def image_label(target: Any) -> torch.Tensor:
    """The image-level label of a sample's target, the only target pretraining and its probe
    use: a segmentation mask's most frequent foreground class
    (:func:`gattn.ssl.probe.image_labels`), a detection target's most frequent box label (the
    lowest on a tie; 0 for an image without boxes)."""
    if isinstance(target, Mapping):
        labels = torch.as_tensor(target["labels"]).long()
        return torch.bincount(labels).argmax() if labels.numel() else torch.tensor(0)
    return image_labels(torch.as_tensor(target)[None])[0]


class ImageOnly:
    """Apply a view to the image of a sample; its target becomes its image-level label
    (:func:`image_label`), so samples of any size batch together (your own images keep their
    sizes, and so their masks and boxes)."""

    def __init__(self, view: Any) -> None:
        self.view = view

    def __call__(self, image: Any, *target: Any) -> Any:
        out = self.view(image)
        if not target:
            return out
        return out, image_label(target[0])


def run_name(p: PretrainParams, seed: int, data: str = "") -> str:
    """``pretrain-<method>-<hash>`` of the section's training params, the seed, a
    :func:`data_fingerprint` and the checkpoint format: equal configs on equal data share a run
    (a rerun resumes), others never do."""
    config = {
        "seed": seed,
        "pretrain": p.model_dump(mode="json", exclude=NOT_TRAINING),
        "data": data,
        "format": CHECKPOINT_FORMAT,
    }
    blob = json.dumps(config, sort_keys=True)
    return f"pretrain-{p.method}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def encoder_config(p: PretrainParams) -> dict[str, Any]:
    """The :func:`build_model` config of the encoder (pooled features, no classifier)."""
    cfg: dict[str, Any] = {
        "task": "cls",
        "backbone": p.backbone,
        "num_classes": 0,
        "img_size": p.img_size,
        "backbone_kwargs": dict(p.backbone_kwargs),
    }
    if p.method == "dino" and isinstance(build_model(cfg), VisionTransformer):
        cfg["backbone_kwargs"].setdefault("dynamic_img_size", True)  # local crops are smaller
    return cfg


Objective = MaskedAutoencoder | DINO


def build_objective(p: PretrainParams, cfg: dict[str, Any]) -> Objective:
    """The trained module: :class:`MaskedAutoencoder` or :class:`DINO` around the encoder."""
    if p.method == "mae":
        m = p.mae
        encoder = build_model(cfg)
        if not isinstance(encoder, VisionTransformer):
            raise TypeError(f"encoder must be a timm VisionTransformer, got {type(encoder)}")
        return MaskedAutoencoder(
            encoder,
            decoder_dim=m.decoder_dim,
            decoder_depth=m.decoder_depth,
            decoder_heads=m.decoder_heads,
            mask_ratio=m.mask_ratio,
            norm_pix_loss=m.norm_pix_loss,
        )
    d = p.dino
    return DINO(
        build_model(cfg),
        build_model(cfg),
        out_dim=d.out_dim,
        hidden_dim=d.hidden_dim,
        bottleneck_dim=d.bottleneck_dim,
        nlayers=d.nlayers,
        norm_last_layer=d.norm_last_layer,
        use_bn=d.use_bn,
    )


def dino_loss(p: PretrainParams) -> DINOLoss:
    """DINO's loss with the section's crops, temperatures, centre momentum and epochs."""
    d = p.dino
    return DINOLoss(
        d.out_dim,
        2 + d.n_local,
        warmup_teacher_temp=d.warmup_teacher_temp,
        teacher_temp=d.teacher_temp,
        warmup_teacher_temp_epochs=d.warmup_teacher_temp_epochs,
        nepochs=p.epochs,
        student_temp=d.student_temp,
        center_momentum=d.center_momentum,
    )


def train_view(p: PretrainParams) -> ImageOnly:
    """The training view of a sample: one MAE crop, or DINO's multi-crop."""
    if p.method == "mae":
        return ImageOnly(mae_view(p.img_size))
    d = p.dino
    local_size = d.local_size or max(8, p.img_size // 2)
    crops = MultiCropViews(
        p.img_size, local_size, d.n_local, d.global_scale, d.local_scale, color_jitter=0.4
    )
    return ImageOnly(crops)


def train_split(p: PretrainParams, prepared: Path, transform: Any) -> Split:
    return subset(open_split("train", prepared, transform), p.max_samples)


class PretrainHooks(Hooks):
    """The pretrain stage in the shared Ray Train loop (:func:`pipelines.train.loop.train`):
    the objective (MAE or DINO) on the training split's views; for DINO, the loss's teacher
    centre and temperature schedule and the teacher's EMA after every step; per-step figures
    every ``log_every_n_steps`` steps; the encoder's weights in every checkpoint."""

    stage = "pretrain"

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.p = p = PretrainParams.model_validate(config["params"])
        self.peak_lr, self.min_lr_ratio = p.lr, p.min_lr / p.lr
        self.warmup_epochs, self.epochs, self.grad_clip = p.warmup_epochs, p.epochs, p.grad_clip
        self.stat_names = STEP_STATS if p.method == "dino" else ()
        self.history = {"epochs": [], "steps": []}
        self.dino_loss: DINOLoss | None = None

    def build(self) -> tuple[nn.Module, Split, int]:
        p = self.p
        model = build_objective(p, self.config["model"])
        if p.method == "dino":
            self.dino_loss = dino_loss(p)
        dataset = train_split(p, Path(self.config["prepared"]), train_view(p))
        return model, dataset, p.batch_size

    def resume(self, folder: Path, state: dict[str, Any]) -> None:
        if self.dino_loss is not None:
            self.dino_loss.load_state_dict(state["loss"])

    def on_device(self) -> None:
        if self.dino_loss is not None:
            self.dino_loss.to(self.device)
        self.momentum = momentum_schedule(self.p.dino.momentum, 1.0, self.total_steps)
        self.window = torch.zeros(len(self.stat_names) + 2, dtype=torch.float64)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        if isinstance(model, DINO):  # DINO's groups: no decay on biases and norms
            return dino_param_groups(model, self.p.weight_decay)
        trained = [q for q in model.parameters() if q.requires_grad]
        return [{"params": trained, "weight_decay": self.p.weight_decay}]

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
        dino = unwrap(model)
        if not isinstance(dino, DINO):
            return
        d = self.p.dino
        if step < d.freeze_last_layer * self.steps_per_epoch:
            dino.cancel_last_layer_gradients()
        if d.weight_decay_end is not None:
            wd = warmup_cosine(step, self.total_steps, self.p.weight_decay, d.weight_decay_end)
            optimizer.param_groups[0]["weight_decay"] = wd  # the decayed group

    def loss(
        self, model: nn.Module, batch: Any, epoch: int, i: int
    ) -> tuple[torch.Tensor, int, list[torch.Tensor]]:
        views, _ = batch
        if self.dino_loss is None:
            return model(views)[0], views.shape[0], []
        student, teacher = model(*views)
        loss, stats = self.dino_loss(student, teacher, epoch + i / self.steps_per_epoch)
        return loss, views[0][0].shape[0], [stats[k] for k in STEP_STATS]

    def after_step(self, model: nn.Module, step: int, lr: float, figures: torch.Tensor) -> None:
        dino = unwrap(model)
        if isinstance(dino, DINO):
            dino.update_teacher(float(self.momentum[min(step, self.total_steps - 1)]))
        self.window += figures
        if (step + 1) % self.p.log_every_n_steps == 0 or step + 1 == self.total_steps:
            mean = means(mean_over_workers(self.window, self.device), self)  # on every worker
            self.history["steps"].append({"step": step + 1, **mean, "lr": lr})
            self.window.zero_()

    def end_epoch(self, model: nn.Module, row: dict[str, Any]) -> None:
        if self.p.probe.every_epoch:  # the k-NN of the encoder now (DINO: the teacher's)
            encoder = build_model(self.config["model"]).to(self.device)
            objective = unwrap(model)
            assert isinstance(objective, Objective)
            encoder.load_state_dict(objective.encoder_state_dict())
            sets = probe_sets(self.p, Path(self.config["prepared"]))
            row["probe_knn_acc"] = knn_accuracy(encoder, sets, self.p, self.device)
        self.history["epochs"].append(row)

    def save(self, model: nn.Module, folder: Path) -> dict[str, Any]:
        if not isinstance(model, Objective):  # what build() made
            raise TypeError(f"not a pretraining objective: {type(model).__name__}")
        encoder = {k: v.detach().contiguous().cpu() for k, v in model.encoder_state_dict().items()}
        save_file(encoder, str(folder / ENCODER))
        return {"loss": self.dino_loss.state_dict() if self.dino_loss is not None else {}}


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker of the stage (:class:`PretrainHooks` in the shared loop)."""
    hooks = PretrainHooks(config)
    train(hooks, hooks.p.cpus_per_worker)


def train_in_process(
    p: PretrainParams, dataset: Dataset[Any], seed: int = 0
) -> tuple[Objective, dict[str, Any]]:
    """The stage's training in this process, without Ray, DDP or checkpoints: the same
    objective, loss, optimizer groups, schedules and hooks, epoch by epoch
    (:func:`pipelines.train.loop.run_epoch`). For tests and benchmarks that need seconds, not
    a Ray start.

    Args:
        p: The ``pretrain`` section.
        dataset: Training samples as the stage's view makes them (``train_view(p)`` applied
            to ``(image, target)``: ``(views, label)``).
        seed: Seeds the initialisation and the data order.

    Returns:
        The trained objective and the history (``epochs``, ``steps``) the stage records.
    """
    hooks = PretrainHooks({"params": p.model_dump(mode="json"), "model": encoder_config(p)})
    torch.manual_seed(seed)
    model = build_objective(p, hooks.config["model"])
    hooks.dino_loss = dino_loss(p) if p.method == "dino" else None
    order = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, p.batch_size, shuffle=True, drop_last=True, generator=order)
    hooks.steps_per_epoch = len(loader)
    hooks.total_steps = p.epochs * hooks.steps_per_epoch
    hooks.on_device()
    optimizer = torch.optim.AdamW(hooks.param_groups(model), lr=p.lr)
    warmup = p.warmup_epochs * hooks.steps_per_epoch
    scheduler = warmup_cosine_scheduler(optimizer, hooks.total_steps, warmup, hooks.min_lr_ratio)
    for epoch in range(p.epochs):
        sums = run_epoch(model, hooks, loader, optimizer, scheduler, epoch)
        hooks.end_epoch(model, {"epoch": epoch + 1, **means(sums, hooks)})
    return model, hooks.history


def _reconstruction(
    p: PretrainParams, cfg: dict[str, Any], ckpt_dir: Path, prepared: Path, out: Path
) -> None:
    """MAE reconstructions of a few validation images by the final model."""
    model = build_objective(p, cfg)
    model.load_state_dict(load_file(str(ckpt_dir / WEIGHTS)))
    model.eval()
    val = open_split("val", prepared, ImageOnly(mae_view(p.img_size, scale=(1.0, 1.0), flip=False)))
    imgs = torch.stack([val[i][0] for i in range(min(4, len(val)))])
    with torch.no_grad():
        _, pred, mask = model(imgs, generator=torch.Generator().manual_seed(0))
    reconstruction_figure(imgs, pred, mask, out, norm_pix_loss=p.mae.norm_pix_loss)


def _step_figures(p: PretrainParams, steps: list[dict[str, Any]], reports_dir: Path) -> None:
    """``curves.png`` (loss, lr per step); for DINO, its collapse diagnostics as
    ``objective.png`` (MAE's is the reconstruction)."""
    x = [s["step"] for s in steps]
    title = f"{p.method.upper()} pretraining, every {p.log_every_n_steps} steps"
    curves = {k: [s[k] for s in steps] for k in ("loss", "lr")}
    curves_figure(x, curves, reports_dir / "curves.png", title)
    if p.method == "dino":
        end = steps[-1]
        title = (
            f"DINO teacher at the end: entropy {end['teacher_entropy']:.2f} of log K "
            f"{math.log(p.dino.out_dim):.2f}, KL to mean {end['teacher_kl_to_mean']:.2f}"
        )
        curves_figure(
            x,
            {k: [s[k] for s in steps] for k in STEP_STATS},
            reports_dir / "objective.png",
            title,
            dino_collapse_references(p.dino.out_dim),
        )


def probe_view(img_size: int) -> ImageOnly:
    """The probe's deterministic view: resize to the encoder's size, to float (a mask becomes
    its image-level label)."""
    return ImageOnly(v2.Compose([v2.Resize((img_size, img_size)), to_float()]))


def probe_sets(p: PretrainParams, prepared: Path) -> tuple[Split, Split, int]:
    """The probes' data: the train split (at most ``probe.max_train`` images) they are fitted
    on, the ``probe.split`` they are scored on, and the number of classes."""
    q = p.probe
    train = subset(open_split("train", prepared, probe_view(p.img_size)), q.max_train)
    query = open_split(q.split, prepared, probe_view(p.img_size))
    return train, query, len(read_splits(prepared)["classes"])


def knn_accuracy(
    encoder: nn.Module, sets: tuple[Split, Split, int], p: PretrainParams, device: Any = "cpu"
) -> float:
    """The k-NN probe's accuracy of ``encoder`` on :func:`probe_sets`' ``sets``."""
    train, query, num_classes = sets
    q = p.probe
    fit_on, scored = (
        extract_features(encoder, DataLoader(ds, batch_size=q.batch_size), device)
        for ds in (train, query)
    )
    pred = knn_predict(fit_on[0], fit_on[1], scored[0], q.k, q.temperature, num_classes)
    return float((pred == scored[1]).float().mean())


def probe(
    p: PretrainParams, cfg: dict[str, Any], seed: int, weights: Path, prepared: Path
) -> dict[str, float]:
    """k-NN and linear-probe accuracies of the pretrained encoder and of its random init.

    The random encoder is the trained one's starting point: the same seed and the same
    :func:`build_objective` call as the training workers. Segmentation targets become
    image-level labels with :func:`gattn.ssl.probe.image_labels` (in :class:`ImageOnly`).

    Returns:
        ``probe_{knn,linear}_acc`` (pretrained), ``probe_{knn,linear}_acc_random``, their
        differences ``probe_{knn,linear}_gain``, and the image counts.
    """
    q = p.probe
    train, query, num_classes = probe_sets(p, prepared)
    torch.manual_seed(seed)
    initial = build_objective(p, cfg).encoder_state_dict()
    out: dict[str, float] = {"probe_num_train": len(train), "probe_num_eval": len(query)}
    for tag, state in (("", load_file(str(weights))), ("_random", initial)):
        encoder = build_model(cfg)
        encoder.load_state_dict(state)
        fit_on, scored = (
            extract_features(encoder, DataLoader(ds, batch_size=q.batch_size))
            for ds in (train, query)
        )
        acc = probe_accuracies(fit_on, scored, q.k, q.temperature, q.weight_decay, num_classes)
        out |= {f"probe_{name}{tag}": value for name, value in acc.items()}
    for m in ("knn", "linear"):
        out[f"probe_{m}_gain"] = out[f"probe_{m}_acc"] - out[f"probe_{m}_acc_random"]
    return out


def pretrain(
    p: PretrainParams,
    seed: int = 0,
    prepared: Path = PREPARED,
    out_dir: Path = PRETRAINED,
    reports_dir: Path = PRETRAIN_REPORTS,
    fail_at_epoch: int | None = None,
) -> dict[str, Any]:
    """Run the stage; returns ``{"metrics", "history", "steps", "run_name", "storage"}``
    (``history``: one row per epoch; ``steps``: one per ``log_every_n_steps`` steps).

    Args:
        p: The ``pretrain`` section.
        seed: The global seed.
        prepared: The ``prepare`` stage's output folder.
        out_dir: Where the encoder and its config are written.
        reports_dir: Where metrics, the loss curve and the figures go.
        fail_at_epoch: Fault injection for tests: the rank-0 worker raises once at the start
            of this (1-based) epoch; the run must resume from the previous checkpoint.
    """
    prepared, out_dir, reports_dir = Path(prepared), Path(out_dir), Path(reports_dir)
    storage = Path(p.storage).resolve()
    name = run_name(p, seed, data_fingerprint(prepared))
    cfg = encoder_config(p)
    storage.mkdir(parents=True, exist_ok=True)
    fail_flag = storage / f"{name}.injected-failure"
    config = loop_config(p, seed, cfg, prepared, fail_at_epoch, fail_flag)
    result, wall = fit_torch_trainer(train_loop, config, p, name, storage)
    work = staging_dir(out_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    history = export(result, p, cfg, prepared, work, reports_dir)
    epochs, steps = history["epochs"], history["steps"]
    write_json(
        work / "config.json",
        {"model": cfg, "method": p.method, "run_name": name, "img_size": p.img_size},
    )
    write_csv(reports_dir / "loss_curve.csv", epochs, list(epochs[-1]))
    curve = [(r["epoch"], r["probe_knn_acc"]) for r in epochs if "probe_knn_acc" in r]
    if curve:
        curves_figure(
            [e for e, _ in curve],
            {"probe_knn_acc": [a for _, a in curve]},
            reports_dir / "knn_curve.png",
            f"{p.method.upper()}: k-NN accuracy ({p.probe.split}) after each epoch",
            xlabel="epoch",
        )
    _step_figures(p, steps, reports_dir)
    metrics = stage_metrics(epochs, wall)
    if p.probe.enabled:
        metrics |= probe(p, cfg, seed, work / ENCODER, prepared)
    write_json(reports_dir / "metrics.json", metrics)
    publish_dir(work, out_dir)
    return {
        "metrics": metrics,
        "history": epochs,
        "steps": steps,
        "run_name": name,
        "storage": str(storage),
    }


def loop_config(
    p: PretrainParams,
    seed: int,
    cfg: dict[str, Any],
    prepared: Path,
    fail_at_epoch: int | None,
    fail_flag: Path,
) -> dict[str, Any]:
    """The workers' config (:class:`PretrainHooks`): the section, the seed, the encoder's
    config, the data, and the tests' fault injection (:func:`pretrain`'s ``fail_at_epoch``)."""
    return {
        "params": p.model_dump(mode="json"),
        "seed": seed,
        "model": cfg,
        "prepared": str(prepared.resolve()),
        "fail_at_epoch": fail_at_epoch,
        "fail_flag": str(fail_flag),
    }


def export(
    result: Any,
    p: PretrainParams,
    cfg: dict[str, Any],
    prepared: Path,
    work: Path,
    reports_dir: Path,
) -> dict[str, Any]:
    """From the run's last checkpoint: the encoder's weights into ``work`` and, for MAE, the
    reconstruction figure; returns the run's history (``epochs`` and ``steps`` rows)."""
    with result.checkpoint.as_directory() as d:
        history: dict[str, Any] = json.loads((Path(d) / HISTORY).read_text())
        shutil.copy(Path(d) / ENCODER, work / ENCODER)
        if p.method == "mae":
            _reconstruction(p, cfg, Path(d), prepared, reports_dir / "objective.png")
    return history


def stage_metrics(epochs: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """The training figures of ``metrics.json`` (the probe adds its accuracies)."""
    final = epochs[-1]
    return {
        "epochs": int(final["epoch"]),
        "loss": float(final["loss"]),
        "first_epoch_loss": float(epochs[0]["loss"]),
        "images_per_s": float(final["images_per_s"]),
        "resumed_from_epoch": int(final["start_epoch"]),
        "wall_s": wall,
    }


def load_encoder(out_dir: Path = PRETRAINED) -> nn.Module:
    """Rebuild the pretrained encoder from ``config.json`` and load its safetensors."""
    out_dir = Path(out_dir)
    cfg = json.loads((out_dir / "config.json").read_text())["model"]
    model = build_model(cfg)
    model.load_state_dict(load_file(str(out_dir / ENCODER)))
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_params_arguments(parser)
    parser.add_argument("--data", type=Path, default=PREPARED, help="prepared data folder")
    parser.add_argument("--out", type=Path, default=PRETRAINED, help="encoder folder to write")
    parser.add_argument(
        "--reports", type=Path, default=PRETRAIN_REPORTS, help="report folder to write"
    )


def log_series(rows: list[dict[str, Any]], step_key: str, prefix: str) -> None:
    """Log every row's numbers as MLflow metrics ``<prefix><name>`` at step ``row[step_key]``."""
    import mlflow

    for row in rows:
        values = {
            f"{prefix}{k}": float(v)
            for k, v in row.items()
            if k not in (step_key, "start_epoch") and isinstance(v, int | float)
        }
        mlflow.log_metrics(values, step=int(row[step_key]))


def run(args: argparse.Namespace) -> int:
    import mlflow

    from pipelines import tracking

    params = load_params(args.params, args.overrides)
    with tracking.stage_run(
        "pretrain", params.model_dump(include={"seed", "pretrain"}), params.tracking.experiment
    ):
        out = pretrain(params.pretrain, params.seed, args.data, args.out, args.reports)
        log_series(out["steps"], "step", "step_")
        log_series(out["history"], "epoch", "epoch_")
        mlflow.log_metrics({k: float(v) for k, v in out["metrics"].items()})
        mlflow.set_tag("gattn.ray_run", out["run_name"])
        mlflow.log_artifacts(str(args.reports), artifact_path="pretrain")
        mlflow.log_artifacts(str(args.out), artifact_path="encoder")
    print(f"pretrain: {json.dumps(out['metrics'])}")
    return 0
