"""Does self-supervised pretraining pay off on real images? The SSL papers' protocol on
Fashion-MNIST: frozen probes, then fine-tuning with few labels.

Usage (each piece is one command, skipped when its result exists, so the study runs across
sittings; ``all`` runs every piece in order)::

    python benchmarks/pretrain_transfer.py prepare --root data/external   # make fashion-mnist
    python benchmarks/pretrain_transfer.py pretrain --recipe dino-vit --seed 0
    python benchmarks/pretrain_transfer.py probe --recipe dino-vit --seed 0
    python benchmarks/pretrain_transfer.py finetune --model vit --init ssl:dino-vit --labels 1
    python benchmarks/pretrain_transfer.py finetune --model mobilenet --init mobilenetv2_100.tv_in1k
    python benchmarks/pretrain_transfer.py table
    python benchmarks/pretrain_transfer.py all --seeds 0 1

- ``prepare`` runs the ``prepare`` stage on ``data.task: torchvision-cls``, Fashion-MNIST
  (60k train images without their labels for pretraining, 10k test images for scoring).
- ``pretrain`` runs the ``pretrain`` stage's own code (:func:`pipelines.stages.pretrain.pretrain`,
  Ray Train included) on the 60k training images; a recipe is a set of ``pretrain`` overrides
  (:data:`RECIPES`: DINO on the ViT and on the CNN, MAE on the ViT).
- ``probe`` scores the frozen encoder on the 10k test images (weighted k-NN and a linear probe,
  :mod:`gattn.ssl.probe`, fitted on ``--probe-train`` training images) against the same network
  at its random initialisation and against raw pixels.
- ``finetune`` trains a classifier with 1 %, 10 % or 100 % of the training labels from the SSL
  encoder, from scratch, or from a weights file (ImageNet), with one recipe for all (AdamW,
  warm-up + cosine, the epochs of :data:`EPOCHS`), and scores it on the test images.
- ``table`` writes ``benchmarks/results/pretrain_transfer.{json,md}``: each row's mean and
  spread over seeds, and the issue's targets checked.

Every piece writes ``outputs/pretrain_transfer/results/<piece>.json`` atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, fill_readme, markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "outputs/pretrain_transfer"
RESULTS_DIR = ROOT / "benchmarks/results"
NUM_CLASSES = 10

# recipe -> pretrain section overrides (on params.yaml's), each run <= 10 min on 2 CPU cores:
# 4 epochs of a fixed number of steps, a k-NN on 5k training / the 1k val images after each
# epoch (the accuracy-vs-epochs curve); DINO at lr 2e-3 (benchmarks/dino_budget.py).
_RUN = {"epochs": 4, "warmup_epochs": 0.2, "probe.every_epoch": True, "probe.max_train": 5000}
RECIPES: dict[str, dict[str, Any]] = {
    "dino-vit": {"method": "dino", "backbone": "gattn_vit_global", "img_size": 64,
                 "lr": 0.002, "max_samples": 8000, **_RUN},  # 250 steps of 32 per epoch
    "dino-cnn": {"method": "dino", "backbone": "gattn_local_cnn", "img_size": 32,
                 "lr": 0.002, "max_samples": 19200, **_RUN},  # 600 steps per epoch
    "mae-vit": {"method": "mae", "backbone": "gattn_vit_global", "img_size": 64,
                "max_samples": 8000, **_RUN},
}  # fmt: skip
# model -> the classifier fine-tuned (backbone, input side = its recipes', backbone arguments)
MODELS: dict[str, dict[str, Any]] = {
    "vit": {"backbone": "gattn_vit_global", "img_size": 64, "backbone_kwargs": {}},
    "cnn": {"backbone": "gattn_local_cnn", "img_size": 32, "backbone_kwargs": {}},
    "mobilenet": {"backbone": "mobilenetv2_100", "img_size": 64, "backbone_kwargs": {}},
}
EPOCHS = {1: 30, 10: 8, 100: 2}  # per label percentage: about 300, 750 and 1900 steps of 64


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _result(kind: str, name: str) -> Path:
    return WORK / "results" / kind / f"{name}.json"


def _gattn() -> str:
    return str(Path(sys.executable).parent / "gattn")


# -- prepare ------------------------------------------------------------------------------
def prepare(root: Path) -> None:
    """The prepare stage on Fashion-MNIST into ``WORK/data``."""
    if (WORK / "data/splits.json").is_file():
        print("prepare: done already", flush=True)
        return
    cmd = [
        _gattn(), "prepare",
        "--out", str(WORK / "data"), "--reports", str(WORK / "reports/prepare"),
        "--set", "data.task=torchvision-cls", "--set", "data.dataset=FashionMNIST",
        "--set", f"data.root={Path(root).resolve()}", "--set", "data.large.num_samples=0",
        "--set", "data.num_samples=null", "--set", "data.val_fraction=0.0167",  # 59k train
    ]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=ROOT)


# -- pretrain -----------------------------------------------------------------------------
def pretrain_params(recipe: str, overrides: list[str]) -> Any:
    from pipelines.config import load_params

    sets = [f"pretrain.{k}={json.dumps(v)}" for k, v in RECIPES[recipe].items()]
    return load_params(ROOT / "params.yaml", [*sets, *overrides])


def pretrain(recipe: str, seed: int, overrides: list[str]) -> None:
    """The pretrain stage's own run (Ray Train) of ``recipe`` at ``seed`` on the 60k training
    images; its encoder goes to ``WORK/encoders/<recipe>-s<seed>``."""
    name = f"{recipe}-s{seed}"
    out = _result("pretrain", name)
    if out.is_file():
        print(f"pretrain {name}: done already", flush=True)
        return
    from pipelines.ray_session import local_ray
    from pipelines.stages.pretrain import pretrain as run_pretrain

    params = pretrain_params(recipe, ["pretrain.probe.enabled=false", *overrides])
    p = params.pretrain.model_copy(update={"storage": str(WORK / "ray")})
    t0 = time.perf_counter()
    with local_ray(num_cpus=os.cpu_count()):
        done = run_pretrain(
            p, seed, WORK / "data", WORK / "encoders" / name, WORK / "reports" / name
        )
    metrics = {k: v for k, v in done["metrics"].items() if isinstance(v, int | float)}
    _write_json(
        out,
        {"recipe": recipe, "seed": seed, "params": p.model_dump(), "metrics": metrics,
         "wall_s": time.perf_counter() - t0},
    )  # fmt: skip


# -- data ---------------------------------------------------------------------------------
def split_tensors(
    split: str, limit: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A split as uint8 ``(N, 3, 28, 28)`` images and labels; ``limit`` draws that many
    images at random (seeded), stratified by nothing (as a user's labelled subset would be)."""
    from pipelines.data import open_split

    ds = open_split(split, WORK / "data", transform=_as_is)  # uint8 (the default: float)
    order = range(len(ds))
    if limit is not None and limit < len(ds):
        g = torch.Generator().manual_seed(1000 + seed)
        order = sorted(torch.randperm(len(ds), generator=g)[:limit].tolist())
    images, labels = zip(*(ds[i] for i in order), strict=True)
    x = torch.stack([torch.as_tensor(x) for x in images])
    if x.dtype != torch.uint8:
        raise TypeError(f"{split}: expected uint8 images, got {x.dtype}")
    return x, torch.tensor(labels)


def _as_is(image: torch.Tensor) -> torch.Tensor:
    """The data set's own ``tv_tensors.Image`` (uint8), as read."""
    return image


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images -> float in [0, 1] at ``size`` x ``size`` (bilinear, as the stages' views)."""
    x = images.float() / 255
    return (
        F.interpolate(x, size=(size, size), mode="bilinear", antialias=False)
        if x.shape[-1] != size
        else x
    )


@torch.no_grad()
def features(
    encoder: torch.nn.Module, images: torch.Tensor, size: int, batch: int = 500
) -> torch.Tensor:
    encoder.eval()
    return torch.cat(
        [encoder(to_input(images[i : i + batch], size)) for i in range(0, len(images), batch)]
    )


# -- probe --------------------------------------------------------------------------------
def probe(recipe: str, seed: int, probe_train: int) -> None:
    """k-NN and linear probe on the 10k test images of the pretrained encoder, of its random
    initialisation (the run's own start) and of raw pixels."""
    name = f"{recipe}-s{seed}"
    out = _result("probe", name)
    if out.is_file():
        print(f"probe {name}: done already", flush=True)
        return
    from safetensors.torch import load_file

    from gattn.models.build import build_model
    from gattn.ssl.probe import probe_accuracies
    from pipelines.stages.pretrain import build_objective, encoder_config

    params = pretrain_params(recipe, [])
    p = params.pretrain
    cfg = encoder_config(p)
    fit_x, fit_y = split_tensors("train", probe_train, seed)
    test_x, test_y = split_tensors("test")
    torch.manual_seed(seed)  # the run's start: the stage's seed and constructor call
    initial = build_objective(p, cfg).encoder_state_dict()
    row: dict[str, Any] = {"recipe": recipe, "seed": seed, "probe_train": len(fit_y)}
    q = p.probe
    for tag, state in (
        ("pretrained", load_file(str(WORK / "encoders" / name / "encoder.safetensors"))),
        ("random", initial),
    ):
        encoder = build_model(cfg)
        encoder.load_state_dict(state)
        acc = probe_accuracies(
            (features(encoder, fit_x, p.img_size), fit_y),
            (features(encoder, test_x, p.img_size), test_y),
            q.k, q.temperature, q.weight_decay, NUM_CLASSES,
        )  # fmt: skip
        row |= {f"{m}_{tag}": v for m, v in acc.items()}
    _write_json(out, row)


def random_val_knn(recipe: str, seed: int) -> float:
    """The pretraining curve's epoch 0: the k-NN of the run's random init on the sets the stage
    scores after every epoch (``probe.max_train`` training images, the val images)."""
    out = _result("curve0", f"{recipe}-s{seed}")
    if not out.is_file():
        from gattn.models.build import build_model
        from pipelines.stages.pretrain import (
            build_objective,
            encoder_config,
            knn_accuracy,
            probe_sets,
        )

        p = pretrain_params(recipe, []).pretrain
        cfg = encoder_config(p)
        torch.manual_seed(seed)  # the run's start, as in probe()
        encoder = build_model(cfg)
        encoder.load_state_dict(build_objective(p, cfg).encoder_state_dict())
        _write_json(out, {"knn_val": knn_accuracy(encoder, probe_sets(p, WORK / "data"), p)})
    return float(json.loads(out.read_text())["knn_val"])


def pixels(probe_train: int) -> None:
    """The raw-pixel baseline: the same probes on the 28 x 28 pixels (one channel)."""
    out = _result("probe", "pixels")
    if out.is_file():
        return
    from gattn.ssl.probe import probe_accuracies

    fit_x, fit_y = split_tensors("train", probe_train, 0)
    test_x, test_y = split_tensors("test")
    flat = [x[:, 0].flatten(1).float() / 255 for x in (fit_x, test_x)]
    acc = probe_accuracies((flat[0], fit_y), (flat[1], test_y), num_classes=NUM_CLASSES)
    _write_json(out, {"probe_train": len(fit_y), **{f"{m}_pixels": v for m, v in acc.items()}})


# -- finetune -----------------------------------------------------------------------------
def finetune(
    model: str, init: str, labels: int, seed: int, batch: int = 64, lr: float = 1e-3
) -> None:
    """Fine-tune ``model`` from ``init`` (``scratch``, ``ssl:<recipe>`` or a weights file) with
    ``labels`` % of the training labels; test accuracy on the 10k test images."""
    tag = init.replace(":", "-").replace("/", "_")
    name = f"{model}-{tag}-{labels}pct-s{seed}"
    out = _result("finetune", name)
    if out.is_file():
        print(f"finetune {name}: done already", flush=True)
        return
    from gattn.models.build import build_model
    from gattn.models.pretrained import load_pretrained, read_encoder
    from pipelines.train.loop import warmup_cosine_scheduler

    m = MODELS[model]
    from pipelines.data import open_split

    total = len(open_split("train", WORK / "data"))
    x, y = split_tensors("train", max(NUM_CLASSES, total * labels // 100), seed)
    test_x, test_y = split_tensors("test")
    cfg = {"task": "cls", "num_classes": NUM_CLASSES, **m}
    torch.manual_seed(seed)
    net = build_model(cfg)
    report: dict[str, Any] = {"matched": 0}
    if init.startswith("ssl:"):
        enc = read_encoder(WORK / "encoders" / f"{init[4:]}-s{seed}")
        if enc is None:
            raise SystemExit(f"no encoder {init[4:]}-s{seed}: run the pretrain piece first")
        r = load_pretrained(net, enc[1])
        report = {"matched": len(r.matched), "missing": len(r.missing)}
    elif init != "scratch":  # a named weights file (gattn.models.weight_files) or a path
        from gattn.models.pretrained import read_weights
        from gattn.models.weight_files import WEIGHT_FILES, weight_file

        path = weight_file(init) if init in WEIGHT_FILES else Path(init)
        r = load_pretrained(net, read_weights(path))
        report = {"matched": len(r.matched), "missing": len(r.missing)}
    epochs = EPOCHS[labels]
    steps_per_epoch = -(-len(y) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = warmup_cosine_scheduler(
        opt, epochs * steps_per_epoch, 0.1 * epochs * steps_per_epoch, 0.01
    )
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            xb = to_input(_augment(x[idx], g), m["img_size"])
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
        print(f"finetune {name}: epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    with torch.no_grad():
        net.eval()
        pred = torch.cat(
            [
                net(to_input(test_x[i : i + 500], m["img_size"])).argmax(1)
                for i in range(0, len(test_y), 500)
            ]
        )
    acc = float((pred == test_y).float().mean())
    _write_json(
        out,
        {"model": model, "init": init, "labels_pct": labels, "seed": seed, "num_train": len(y),
         "epochs": epochs, "test_acc": acc, "init_report": report,
         "wall_s": time.perf_counter() - t0},
    )  # fmt: skip
    print(f"finetune {name}: test accuracy {acc:.4f}", flush=True)


def _augment(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (padding by zeros)."""
    flip = torch.rand(len(images), generator=g) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    padded = F.pad(images, (2, 2, 2, 2))
    dx, dy = (int(v) for v in torch.randint(0, 5, (2,), generator=g))
    return padded[..., dy : dy + images.shape[-2], dx : dx + images.shape[-1]]


# -- the table ------------------------------------------------------------------------------
def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ({max(values) - min(values):.3f}, n={len(values)})"


def _load(kind: str) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((WORK / "results" / kind).glob("*.json"))]


def curve_figure(pix: dict[str, Any]) -> dict[str, list[list[float]]]:
    """``pretrain_transfer_curve.png``: each pretraining run's k-NN accuracy (on the 1k val
    images) after every epoch, epoch 0 its random init, beside the raw pixels' k-NN; and each
    DINO recipe's collapse diagnostics (seed 0) as ``pretrain_transfer_<recipe>_dino.png``.
    Returns ``{run: [[epoch, accuracy], ...]}``."""
    import csv
    import shutil

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gattn.diagnostics.plots import save_figure

    curves: dict[str, list[list[float]]] = {}
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, recipe in enumerate(RECIPES):
        for seed_file in sorted((WORK / "results" / "pretrain").glob(f"{recipe}-s*.json")):
            name = seed_file.stem
            run = json.loads(seed_file.read_text())
            rows = list(csv.DictReader((WORK / "reports" / name / "loss_curve.csv").open()))
            points = [[0.0, random_val_knn(run["recipe"], run["seed"])]]
            points += [[float(r["epoch"]), float(r["probe_knn_acc"])] for r in rows]
            curves[name] = points
            ax.plot(*zip(*points, strict=True), marker="o", color=f"C{i}", lw=1.2,
                    ls="-" if name.endswith("s0") else "--", label=name)  # fmt: skip
    if "knn_acc_pixels" in pix:
        ax.axhline(pix["knn_acc_pixels"], ls=":", color="k", lw=1, label="raw pixels (test)")
    ax.set_xlabel("pretraining epoch (0: random init)")
    ax.set_ylabel("k-NN accuracy, 1k val images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Fashion-MNIST: frozen k-NN during self-supervised pretraining", fontsize=9)
    fig.tight_layout()
    save_figure(fig, RESULTS_DIR / "pretrain_transfer_curve.png")
    for recipe in (r for r in RECIPES if r.startswith("dino")):
        src = WORK / "reports" / f"{recipe}-s0" / "objective.png"
        if src.is_file():
            shutil.copyfile(src, RESULTS_DIR / f"pretrain_transfer_{recipe}_dino.png")
    return curves


def table() -> dict[str, Any]:
    """Collect every piece's result: probe and fine-tune tables (mean (spread, n) over seeds)
    and the issue's targets, into ``benchmarks/results/pretrain_transfer.{json,md}``."""
    probes = [r for r in _load("probe") if "recipe" in r]
    pix = next((r for r in _load("probe") if "knn_acc_pixels" in r), {})
    pre = {(r["recipe"], r["seed"]): r for r in _load("pretrain")}
    probe_rows = []
    for recipe in RECIPES:
        rs = [r for r in probes if r["recipe"] == recipe]
        if not rs:
            continue
        walls = [pre[(recipe, r["seed"])]["wall_s"] / 60 for r in rs if (recipe, r["seed"]) in pre]
        probe_rows.append(
            {
                "recipe": recipe,
                "knn pretrained": _stats([r["knn_acc_pretrained"] for r in rs]),
                "knn random init": _stats([r["knn_acc_random"] for r in rs]),
                "knn gain": _stats([r["knn_acc_pretrained"] - r["knn_acc_random"] for r in rs]),
                "linear pretrained": _stats([r["linear_acc_pretrained"] for r in rs]),
                "linear random init": _stats([r["linear_acc_random"] for r in rs]),
                "pretrain min": _stats(walls),
            }
        )
    fts = _load("finetune")
    ft_rows = []
    for model, init in sorted({(r["model"], r["init"]) for r in fts}):
        row: dict[str, Any] = {"model": model, "init": init}
        for pct in EPOCHS:
            accs = [
                r["test_acc"]
                for r in fts
                if (r["model"], r["init"], r["labels_pct"]) == (model, init, pct)
            ]
            row[f"{pct}% labels"] = _stats(accs)
        ft_rows.append(row)
    targets = []
    for recipe in (r for r in RECIPES if r.startswith("dino")):
        rs = [r for r in probes if r["recipe"] == recipe]
        if rs and pix:
            ok = all(
                r["knn_acc_pretrained"] >= r["knn_acc_random"] + 0.05
                and r["knn_acc_pretrained"] >= pix["knn_acc_pixels"]
                for r in rs
            )
            targets.append(
                f"{recipe}: k-NN >= random init + 5 points and >= raw pixels on every seed: {ok}"
            )
    for model, init in sorted(
        {(r["model"], r["init"]) for r in fts if r["init"].startswith("ssl:")}
    ):
        pairs = [
            (r["test_acc"], s["test_acc"])
            for r in fts
            for s in fts
            if (r["model"], r["init"], r["labels_pct"]) == (model, init, 1)
            and (s["model"], s["init"], s["labels_pct"], s["seed"])
            == (model, "scratch", 1, r["seed"])
        ]
        if pairs:
            ok = all(a >= b + 0.03 for a, b in pairs)
            targets.append(
                f"{model} {init}, 1% labels: >= scratch + 3 points on all {len(pairs)} seeds: {ok}"
            )
    probe_cols = list(probe_rows[0]) if probe_rows else ["recipe"]
    ft_cols = ["model", "init", *(f"{pct}% labels" for pct in EPOCHS)]
    meta = {
        **environment(torch.device("cpu")),
        "data": "Fashion-MNIST: 58,998 train images (pretraining, without labels), 10k test images",
        "cells": "mean (spread = max - min, n = seeds)",
        "command": "python benchmarks/pretrain_transfer.py all --seeds 0 1",
        "epochs": EPOCHS,
        "recipes": RECIPES,
        "models": MODELS,
        "pixels": pix,
        "probe": probe_rows,
        "knn_curves": curve_figure(pix),
        "targets": targets,
    }
    notes = "\n".join(
        [
            "Above: fine-tuning with 1 / 10 / 100 % of the training labels, test accuracy.",
            "",
            "## Frozen probes on the 10k test images",
            "",
            f"Raw pixels: k-NN {pix.get('knn_acc_pixels', float('nan')):.3f}, linear "
            f"{pix.get('linear_acc_pixels', float('nan')):.3f}.",
            "",
            markdown_table(probe_rows, probe_cols),
            "k-NN after each pretraining epoch: `pretrain_transfer_curve.png`; DINO's collapse "
            "diagnostics (seed 0): `pretrain_transfer_dino-*_dino.png`.",
            "",
            "## Targets (issue 16)",
            "",
            *[f"- {t}" for t in targets],
            "",
        ]
    )
    write_results("pretrain_transfer", ft_rows, ft_cols, meta, notes)
    fill_readme(
        "pretrain-transfer",
        "Fine-tuning, test accuracy (mean (spread, n seeds)):\n\n"
        + markdown_table(ft_rows, ft_cols)
        + "\nFrozen probes on the 10k test images (raw pixels: k-NN "
        + f"{pix.get('knn_acc_pixels', float('nan')):.3f}, linear "
        + f"{pix.get('linear_acc_pixels', float('nan')):.3f}):\n\n"
        + markdown_table(probe_rows, probe_cols)
        + "\n"
        + "".join(f"- {t}\n" for t in targets),
    )
    return meta


def run_all(seeds: list[int], root: Path, probe_train: int, imagenet: str | None) -> None:
    prepare(root)
    pixels(probe_train)
    for seed in seeds:
        for recipe in RECIPES:
            pretrain(recipe, seed, [])
            probe(recipe, seed, probe_train)
    inits = {
        "vit": ["scratch", "ssl:dino-vit", "ssl:mae-vit"],
        "cnn": ["scratch", "ssl:dino-cnn"],
        "mobilenet": ["scratch", *([imagenet] if imagenet else [])],
    }
    # the ImageNet MobileNetV2 rows last: at 64 px they cost as much as all the others
    for group in (("vit", "cnn"), ("mobilenet",)):
        for labels in EPOCHS:
            for seed in seeds if labels != 100 else seeds[:1]:
                for model in group:
                    for init in inits[model]:
                        finetune(model, init, labels, seed)
    table()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="piece", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--root", type=Path, default=ROOT / "data/external")
    for piece in ("pretrain", "probe"):
        a = sub.add_parser(piece)
        a.add_argument("--recipe", choices=list(RECIPES), required=True)
        a.add_argument("--seed", type=int, default=0)
        a.add_argument("--set", dest="overrides", action="append", default=[], help="pretrain.X=V")
        a.add_argument("--probe-train", type=int, default=10000)
    a = sub.add_parser("pixels")
    a.add_argument("--probe-train", type=int, default=10000)
    a = sub.add_parser("finetune")
    a.add_argument("--model", choices=list(MODELS), required=True)
    a.add_argument("--init", default="scratch", help="scratch | ssl:<recipe> | a weights file")
    a.add_argument("--labels", type=int, choices=list(EPOCHS), default=1)
    a.add_argument("--seed", type=int, default=0)
    sub.add_parser("table")
    a = sub.add_parser("all")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    a.add_argument("--root", type=Path, default=ROOT / "data/external")
    a.add_argument("--probe-train", type=int, default=10000)
    a.add_argument(
        "--imagenet",
        default="mobilenetv2_100.tv_in1k",
        help="ImageNet weights (a gattn.models.weight_files name or a file) for the mobilenet row",
    )
    args = ap.parse_args()
    if args.piece == "prepare":
        prepare(args.root)
    elif args.piece == "pretrain":
        pretrain(args.recipe, args.seed, args.overrides)
    elif args.piece == "probe":
        probe(args.recipe, args.seed, args.probe_train)
    elif args.piece == "pixels":
        pixels(args.probe_train)
    elif args.piece == "finetune":
        finetune(args.model, args.init, args.labels, args.seed)
    elif args.piece == "table":
        table()
    else:
        run_all(args.seeds, args.root, args.probe_train, args.imagenet)


if __name__ == "__main__":
    main()
