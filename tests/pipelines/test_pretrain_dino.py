"""DINO at a CPU budget: the stage's recipe does not collapse, the paper's ImageNet one does.

Runs the pretrain stage's own training without Ray (:func:`train_in_process`: its hooks in the
shared loop's epochs) on a few hundred small crops of scikit-image's photos, with a tiny ViT:
seconds, not minutes. The collapse diagnostics are
those the stage logs (:func:`gattn.ssl.collapse_stats`): the teacher entropy must end well
inside ``(0, log K)`` and the KL from each teacher output to the batch mean well above 0.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines.config import PretrainParams
from pipelines.stages.pretrain import (
    PretrainHooks,
    build_objective,
    dino_loss,
    encoder_config,
    train_in_process,
    train_view,
)

skimage_data = pytest.importorskip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
# The paper's ImageNet settings the stage had before (out_dim aside): EMA momentum 0.996,
# no BatchNorm in the head, the last layer trained from the first step.
PAPER = {
    "out_dim": 1024,
    "use_bn": False,
    "momentum": 0.996,
    "freeze_last_layer": 0.0,
    "weight_decay_end": None,
}


def photo_crops(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """``n`` random square crops (an eighth to a half of the shorter side) of the photos."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage_data, name)()[..., :3] for name in PHOTOS]
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.uniform(0.125, 0.5) * min(h, w))
        y, x = rng.integers(0, h - side), rng.integers(0, w - side)
        crop = Image.fromarray(photo[y : y + side, x : x + side])
        crops.append(crop.resize((size, size), Image.Resampling.BILINEAR))
    return crops


class Views(Dataset[Any]):
    """The stage's training view of every image (label 0: DINO uses none)."""

    def __init__(self, images: list[Image.Image], view: Any) -> None:
        self.images, self.view = images, view

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return self.view(self.images[i], np.zeros((1, 1), dtype=np.int64))


def train_dino(p: PretrainParams, images: list[Image.Image]) -> list[dict[str, Any]]:
    """The stage's DINO without Ray; the per-step history rows."""
    return train_in_process(p, Views(images, train_view(p)))[1]["steps"]


def small_run(**dino: Any) -> PretrainParams:
    return PretrainParams.model_validate(
        {
            "method": "dino",
            "img_size": 32,
            "epochs": 4,
            "batch_size": 32,
            "warmup_epochs": 1.0,
            "log_every_n_steps": 4,
            "backbone_kwargs": TINY_VIT,
            "dino": dino,
        }
    )


def final_stats(steps: list[dict[str, Any]]) -> tuple[float, float]:
    """Teacher entropy and KL to the batch mean over the last logged window."""
    return steps[-1]["teacher_entropy"], steps[-1]["teacher_kl_to_mean"]


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return photo_crops(256)


def test_stage_defaults_keep_dino_away_from_both_collapses(images: list[Image.Image]) -> None:
    p = small_run()
    entropy, kl = final_stats(train_dino(p, images))
    log_k = math.log(p.dino.out_dim)
    assert 0.5 < entropy < log_k - 1.0, (entropy, log_k)
    assert kl > 0.5, kl


def test_paper_settings_collapse_at_this_budget(images: list[Image.Image]) -> None:
    """The control: without the stage's changes the same run goes uniform, so the test above
    can fail."""
    p = small_run(**PAPER)
    entropy, kl = final_stats(train_dino(p, images))
    assert entropy > math.log(p.dino.out_dim) - 0.5 or kl < 0.1, (entropy, kl)


def test_hooks_freeze_the_last_layer_then_schedule_weight_decay(images: list[Image.Image]) -> None:
    p = small_run(freeze_last_layer=1.0, weight_decay_end=0.4)
    cfg = encoder_config(p)
    hooks = PretrainHooks({"params": p.model_dump(mode="json"), "model": cfg, "seed": 0})
    hooks.steps_per_epoch, hooks.total_steps = 4, 16
    model = build_objective(p, cfg)
    optimizer = torch.optim.AdamW(hooks.param_groups(model), lr=p.lr)
    batch = next(iter(DataLoader(Views(images[:4], train_view(p)), batch_size=4)))
    last = list(model.student.head.last_layer.parameters())
    decays = []
    for step in (0, 3, 4, 15):
        optimizer.zero_grad()
        student, teacher = model(*batch[0])
        dino_loss(p)(student, teacher, step / 4)[0].backward()
        hooks.before_step(model, optimizer, step)
        frozen = [q.grad is None for q in last if q.requires_grad]
        assert frozen and all(frozen) == (step < 4), step  # the first epoch only
        decays.append(optimizer.param_groups[0]["weight_decay"])
        assert optimizer.param_groups[1]["weight_decay"] == 0.0  # biases and norms
    assert decays[0] == pytest.approx(p.weight_decay)
    assert decays == sorted(decays) and decays[-1] == pytest.approx(0.4, abs=0.01)
