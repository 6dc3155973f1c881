"""Peak memory of a training step: the fake-tensor estimate and the real measurement agree with
an independent reference (the profiler's allocator events) within 15%."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from gattn.budget import (
    estimate_peak_memory,
    measure_peak_memory,
    profiled_peak_memory,
)
from gattn.budget.estimate import allocator_peak, make_batch, train_step
from gattn.budget.memory import StoragePeak
from gattn.models import build_model

NO_LS = {"ls_init_value": None}
# One of each family and of each kind of block the tune search injects, small enough that the
# real (profiled) step takes well under a second on one core.
CONFIGS = {
    "cnn+plain attention@stride2": (
        {
            "task": "seg",
            "backbone": "gattn_local_cnn",
            "num_classes": 4,
            "inject": [{"block": "global_attn", "stage": 1, "fused_attn": False, **NO_LS}] * 2,
            "head": "psp",
            "head_channels": 16,
        },
        4,
        32,
    ),
    "swin+global tokens": (
        {
            "task": "seg",
            "backbone": "swin_tiny_patch4_window7_224",
            "backbone_kwargs": {
                "embed_dim": 16,
                "depths": [2, 2],
                "num_heads": [1, 2],
                "window_size": 4,
            },
            "num_classes": 3,
            "inject": [{"block": "global_tokens", "stage": 2, "window_size": 4}],
            "head": "fcn",
            "head_channels": 16,
        },
        2,
        32,
    ),
    "vit+nonlocal": (
        {
            "task": "seg",
            "backbone": "gattn_vit_global",
            "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2},
            "num_classes": 4,
            "inject": "nonlocal@1",
            "head": "fcn",
            "head_channels": 16,
        },
        4,
        32,
    ),
    "detector P2+ppm,large_kernel@top": (
        {
            "task": "det",
            "recipe": "gattn_det_p2_ppm_lk",
            "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [8, 16, 16, 32]},
            "num_classes": 3,
            "fpn_channels": 16,
        },
        4,
        64,
    ),
    "detector P2+global tokens@all": (
        {
            "task": "det",
            "backbone": "gattn_local_cnn",
            "backbone_kwargs": {"widths": [8, 16, 16, 32]},
            "num_classes": 2,
            "min_level": 2,
            "fpn_channels": 16,
            "global_modules": [{"block": "global_tokens", "window_size": 4, **NO_LS}],
            "global_at": "all",
            "head_kwargs": {"num_convs": 1},
        },
        4,
        64,
    ),
    "classifier+ppm,se": (
        {"task": "cls", "backbone": "gattn_local_cnn", "num_classes": 2, "inject": "ppm@2,se@2"},
        8,
        32,
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_estimate_and_measurement_match_the_profiler(name: str) -> None:
    cfg, batch, size = CONFIGS[name]
    reference = profiled_peak_memory(cfg, batch, size)
    estimate = estimate_peak_memory(cfg, batch, size)
    measured = measure_peak_memory(cfg, batch, size)
    assert abs(estimate - reference) <= 0.15 * reference, (estimate, reference)
    assert abs(measured - reference) <= 0.15 * reference, (measured, reference)


def test_estimate_grows_with_batch_and_resolution() -> None:
    cfg, batch, size = CONFIGS["cnn+plain attention@stride2"]
    base = estimate_peak_memory(cfg, batch, size)
    assert estimate_peak_memory(cfg, 2 * batch, size) > 1.5 * base
    # Plain attention at stride 2 holds (N x N) scores: 2x the side is 16x the scores.
    assert estimate_peak_memory(cfg, batch, 2 * size) > 6 * base


def test_estimate_allocates_no_activations() -> None:
    cfg, _, _ = CONFIGS["cnn+plain attention@stride2"]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        huge = estimate_peak_memory(cfg, 64, 128)  # a step of tens of GiB
    assert huge > 2**33
    assert allocator_peak(prof) < 2**26  # real memory: the model's parameters and little else


def test_storage_peak_counts_storages_once_and_releases_them() -> None:
    tracker = StoragePeak()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a[:10]  # same storage: not counted again
        b = torch.empty(500, dtype=torch.float64)  # 4000 bytes
        assert tracker.current == 8000
        del b
        c = torch.empty(250)  # 1000 bytes, after b was freed
    assert tracker.peak == 8000
    assert tracker.current == 5000
    del a, view, c


def test_a_training_step_needs_num_classes() -> None:
    cfg = {"task": "cls", "backbone": "gattn_local_cnn", "num_classes": 0}
    with pytest.raises(ValueError, match="num_classes"):
        estimate_peak_memory(cfg, 2, 32)


def test_detector_batches_hold_boxes_and_train() -> None:
    cfg, batch, size = CONFIGS["detector P2+ppm,large_kernel@top"]
    images, targets = make_batch(cfg, batch, size, boxes_per_image=5)
    assert images.shape == (batch, 3, size, size) and len(targets) == batch
    boxes = targets[0]["boxes"]
    assert boxes.shape == (5, 4) and (boxes >= 0).all() and (boxes <= size).all()
    sides = boxes[:, 2:] - boxes[:, :2]
    assert ((sides >= 4) & (sides <= 16)).all()
    assert ((targets[0]["labels"] >= 0) & (targets[0]["labels"] < 3)).all()
    model = build_model({**cfg, "img_size": size})
    optimizer = torch.optim.AdamW(model.parameters())
    assert torch.isfinite(train_step(model, optimizer, images, targets))
    with pytest.raises(ValueError, match="class_weight"):
        train_step(model, optimizer, images, targets, torch.ones(3))


def test_detector_estimate_counts_the_boxes() -> None:
    cfg, batch, size = CONFIGS["detector P2+global tokens@all"]
    few = estimate_peak_memory(cfg, batch, size, boxes_per_image=1)
    many = estimate_peak_memory(cfg, batch, size, boxes_per_image=400)
    assert many > few + 340 * 400 * 4 * 4  # at least one (locations x boxes x 4) float tensor
