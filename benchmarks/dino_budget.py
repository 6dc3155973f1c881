"""Does DINO learn at a CPU budget? Fashion-MNIST, a step budget, k-NN against random init.

Usage::

    python benchmarks/dino_budget.py --backbone gattn_vit_global --img-size 32 --steps 900 \\
        --set lr=0.002 [--set dino.use_bn=false ...] [--threads 1] [--out dino_budget]

Trains the pretrain stage's DINO (params.yaml's ``pretrain`` section with ``method: dino``,
the overrides given) in this process, without Ray (:func:`train_in_process`, the stage's own
hooks), on ``--steps`` batches of Fashion-MNIST training images (as few passes as fit; 28 x 28
greyscale, repeated to RGB; the stage's views resize them to ``img_size``), then probes the
exported encoder (the teacher) and the same encoder at its random initialisation with the
stage's frozen-feature probes (:mod:`gattn.ssl.probe`: weighted k-NN, k = 20, T = 0.07, and
the linear probe), fitted on ``--probe-train`` training images, scored on ``--probe-test``
test images. Prints, and writes ``benchmarks/results/<--out>.{json,md}``: the teacher entropy
and KL-to-mean at the end (the collapse diagnostics), the accuracies and the training time.

The data are the gzipped IDX files of Debian's ``dataset-fashion-mnist`` package
(``/usr/share/datasets/fashion-mnist``; ``--data`` for another folder).
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from gattn.models.build import build_model  # noqa: E402
from gattn.ssl.probe import extract_features, probe_accuracies  # noqa: E402
from pipelines.config import load_params  # noqa: E402
from pipelines.stages.pretrain import (  # noqa: E402
    build_objective,
    encoder_config,
    probe_view,
    train_in_process,
    train_view,
)

ROOT = Path(__file__).resolve().parent.parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
TRAIN_IMAGES = 60_000
COLUMNS = [
    "backbone",
    "img_size",
    "steps",
    "train_s",
    "entropy_end",
    "log_k",
    "kl_end",
    "knn_teacher",
    "knn_student",
    "knn_random",
    "knn_gain",
    "linear_teacher",
    "linear_random",
]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped) as a uint8 array."""
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(root: Path, part: str, n: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    """``n`` images of a part (``train``/``t10k``) drawn at random (seeded), RGB, with labels."""
    x = read_idx(root / f"{part}-images-idx3-ubyte.gz")
    y = read_idx(root / f"{part}-labels-idx1-ubyte.gz")
    pick = np.random.default_rng(seed).permutation(len(x))[:n]
    return [Image.fromarray(x[i]).convert("RGB") for i in pick], [int(y[i]) for i in pick]


class Labelled(Dataset[Any]):
    """Images and labels through a view: ``view(image, label-mask)`` or ``view(image)``."""

    def __init__(self, images: list[Image.Image], labels: list[int], view: Any, train: bool):
        self.images, self.labels, self.view, self.train = images, labels, view, train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        if self.train:  # the stage's view takes a mask; DINO uses no label
            return self.view(self.images[i], np.zeros((1, 1), dtype=np.int64))
        return self.view(self.images[i]), self.labels[i]


def knn_and_linear(
    cfg: dict[str, Any], state: dict[str, torch.Tensor], fit: Dataset[Any], scored: Dataset[Any]
) -> dict[str, float]:
    encoder = build_model(cfg)
    encoder.load_state_dict(state)
    fit_on, test_on = (
        extract_features(encoder, DataLoader(d, batch_size=256)) for d in (fit, scored)
    )
    return probe_accuracies(fit_on, test_on, 20, 0.07, 1e-3, num_classes=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="gattn_vit_global")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=900, help="optimizer steps (one pass)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--probe-train", type=int, default=5000)
    parser.add_argument("--probe-test", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=FASHION)
    parser.add_argument("--out", default=None, help="results name (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # --steps as whole passes over a random subset of the 60k training images: as few
    # passes as fit, so the stage's epoch-based schedules span the step budget.
    given = load_params(ROOT / "params.yaml", [f"pretrain.{o}" for o in args.overrides])
    batch_size = given.pretrain.batch_size
    epochs = math.ceil(args.steps / (TRAIN_IMAGES // batch_size))
    fixed = {
        "method": "dino",
        "backbone": args.backbone,
        "img_size": args.img_size,
        "epochs": epochs,
        "warmup_epochs": 0.05 * epochs,
        "max_samples": math.ceil(args.steps / epochs) * batch_size,
    }
    overrides = [f"pretrain.{k}={v}" for k, v in fixed.items()]
    overrides += [f"pretrain.{o}" for o in args.overrides]
    p = load_params(ROOT / "params.yaml", overrides).pretrain
    images, labels = fashion_mnist(args.data, "train", p.max_samples or 0, args.seed)
    train_set = Labelled(images, labels, train_view(p), train=True)

    t0 = time.perf_counter()
    model, history = train_in_process(p, train_set, args.seed)
    train_s = time.perf_counter() - t0
    end = history["steps"][-1]

    cfg = encoder_config(p)
    view = probe_view(p.img_size)
    fit = Labelled(*fashion_mnist(args.data, "train", args.probe_train, args.seed + 1), view, False)
    scored = Labelled(*fashion_mnist(args.data, "t10k", args.probe_test, args.seed), view, False)
    torch.manual_seed(args.seed)
    initial = build_objective(p, cfg).encoder_state_dict()
    acc = {
        tag: knn_and_linear(cfg, state, fit, scored)
        for tag, state in (
            ("teacher", model.encoder_state_dict()),
            ("student", model.encoder_state_dict("student")),
            ("random", initial),
        )
    }
    row = {
        "backbone": p.backbone,
        "img_size": p.img_size,
        "steps": end["step"],
        "train_s": round(train_s, 1),
        "entropy_end": round(end["teacher_entropy"], 3),
        "log_k": round(math.log(p.dino.out_dim), 3),
        "kl_end": round(end["teacher_kl_to_mean"], 3),
        "knn_teacher": acc["teacher"]["knn_acc"],
        "knn_student": acc["student"]["knn_acc"],
        "knn_random": acc["random"]["knn_acc"],
        "knn_gain": acc["teacher"]["knn_acc"] - acc["random"]["knn_acc"],
        "linear_teacher": acc["teacher"]["linear_acc"],
        "linear_random": acc["random"]["linear_acc"],
    }
    print(row)
    if args.out:
        meta = {
            **environment(torch.device("cpu")),
            "overrides": args.overrides,
            "pretrain": p.model_dump(mode="json"),
        }
        write_results(args.out, [row], COLUMNS, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
