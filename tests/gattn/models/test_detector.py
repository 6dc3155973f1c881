"""The detector: levels for P2 vs P3, training, predict's format, recipes, config errors."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from gattn.models import (
    DET_RECIPES,
    Detector,
    DetOutputs,
    build_model,
    detector_recipes,
    load_model,
    save_model,
)
from gattn.modules.large_kernel import LargeKernelBlock
from gattn.modules.pyramid_pooling import PyramidPoolingModule

TINY = {"layers": [1, 1, 1, 1], "channels": [8, 8, 16, 16]}
RECIPES = ["gattn_det_p2", "gattn_det_p2_ppm_lk", "gattn_det_p2_tokens", "gattn_det_p3"]


def tiny_cfg(**overrides: object) -> dict[str, object]:
    return {
        "task": "det",
        "backbone": "resnet18",
        "backbone_kwargs": TINY,
        "num_classes": 3,
        "fpn_channels": 16,
        "head_kwargs": {"num_convs": 1},
        **overrides,
    }


def targets() -> list[dict[str, torch.Tensor]]:
    return [
        {
            "boxes": torch.tensor([[8.0, 10, 16, 18], [30, 30, 52, 60]]),
            "labels": torch.tensor([0, 2]),
        },
        {"boxes": torch.tensor([[40.0, 4, 46, 12]]), "labels": torch.tensor([1])},
    ]


@pytest.mark.parametrize(("min_level", "strides"), [(2, (4, 8, 16, 32)), (3, (8, 16, 32))])
def test_levels_and_shapes(min_level: int, strides: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(min_level=min_level, img_size=64))
    assert isinstance(model, Detector) and model.strides == strides
    out = model(torch.randn(2, 3, 64, 96))
    assert isinstance(out, DetOutputs) and out.image_size == (64, 96)
    for s, cls, reg, ctr in zip(strides, out.cls_logits, out.bbox_reg, out.centerness, strict=True):
        assert cls.shape == (2, 3, 64 // s, 96 // s)
        assert reg.shape == (2, 4, 64 // s, 96 // s) and (reg >= 0).all()
        assert ctr.shape == (2, 1, 64 // s, 96 // s)


def test_max_level_and_a_shallow_backbone_bound_the_pyramid() -> None:
    assert build_model(tiny_cfg(min_level=2, max_level=4)).strides == (4, 8, 16)
    local = {"backbone": "gattn_local_cnn", "backbone_kwargs": {"widths": [8, 8, 16]}}
    assert build_model(tiny_cfg(min_level=2, **local)).strides == (4, 8)


def test_classifier_bias_follows_the_prior() -> None:
    model = build_model(tiny_cfg()).eval()
    probs = model(torch.zeros(1, 3, 64, 64)).cls_logits[0].sigmoid()
    torch.testing.assert_close(probs, torch.full_like(probs, 0.01), atol=2e-3, rtol=0)


def test_overfits_two_images() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(min_level=2))
    images = torch.rand(2, 3, 64, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = model.loss(model(images), targets())
        loss["loss"].backward()
        optimizer.step()
        losses.append(loss["loss"].item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0], losses


def test_empty_targets_give_a_finite_loss() -> None:
    model = build_model(tiny_cfg())
    out = model(torch.randn(2, 3, 64, 64))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model.loss(out, [empty, targets()[1]])
    assert set(losses) == {"loss", "loss_cls", "loss_box", "loss_ctr"}
    losses["loss"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(model.loss(model(torch.randn(1, 3, 64, 64)), [empty])["loss"])


def test_predict_format() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg(min_level=2)).eval()
    results = model.predict(torch.rand(2, 3, 48, 64), score_thresh=0.01, max_det=7)
    assert len(results) == 2
    for r in results:
        assert set(r) == {"boxes", "scores", "labels"}
        n = len(r["scores"])
        assert 0 < n <= 7
        assert r["boxes"].shape == (n, 4) and r["boxes"].dtype == torch.float32
        assert r["labels"].dtype == torch.long and ((r["labels"] >= 0) & (r["labels"] < 3)).all()
        assert (r["scores"] > 0.01).all() and (r["scores"].diff() <= 0).all()
        assert (r["boxes"][:, 2:] >= r["boxes"][:, :2]).all()
        assert (r["boxes"][:, 0::2] <= 64).all() and (r["boxes"][:, 1::2] <= 48).all()
        assert (r["boxes"] >= 0).all()
    assert model.predict(torch.rand(1, 3, 48, 64), score_thresh=0.99)[0]["boxes"].shape == (0, 4)


def test_global_modules_on_the_top_or_every_level() -> None:
    specs = ["ppm", {"block": "large_kernel", "kernel_size": 5}]
    top = build_model(tiny_cfg(min_level=2, global_modules=specs))
    assert [len(c) for c in top.fpn.context] == [0, 0, 0, 2]
    assert isinstance(top.fpn.context[-1][0], PyramidPoolingModule)
    every = build_model(tiny_cfg(min_level=3, global_modules=["nonlocal"], global_at="all"))
    assert [len(c) for c in every.fpn.context] == [1, 1, 1]
    assert every(torch.randn(1, 3, 64, 64)).cls_logits[0].shape == (1, 3, 8, 8)


def test_global_context_starts_as_a_no_op() -> None:
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    x = torch.randn(2, 3, 64, 64)
    context = model.encode_context(x)
    assert context.shape == (2, 16)
    plain, fed = model(x), model(x, global_context=context)
    torch.testing.assert_close(fed.cls_logits[0], plain.cls_logits[0])
    torch.nn.init.normal_(model.context_proj.weight)
    assert not torch.allclose(model(x, global_context=context).cls_logits[0], plain.cls_logits[0])


def test_channels_last_backbone() -> None:
    swin = {
        "backbone": "swin_tiny_patch4_window7_224",
        "backbone_kwargs": {
            "embed_dim": 16,
            "depths": [2, 2],
            "num_heads": [1, 2],
            "window_size": 4,
        },
        "img_size": 64,
        "min_level": 2,
    }
    model = build_model(tiny_cfg(**swin))
    assert model.strides == (4, 8)
    out = model(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in out.cls_logits] == [16, 8]


def test_recipes_are_registered_and_build() -> None:
    assert detector_recipes() == RECIPES == sorted(timm.list_models("gattn_det_*"))
    assert sorted(DET_RECIPES) == RECIPES
    model = build_model({"task": "det", "recipe": "gattn_det_p2_ppm_lk", "num_classes": 2})
    assert model.strides == (4, 8, 16, 32)
    assert [type(b) for b in model.fpn.context[-1]] == [PyramidPoolingModule, LargeKernelBlock]
    assert timm.create_model("gattn_det_p3", num_classes=2).strides == (8, 16, 32)
    tokens = build_model({"task": "det", "recipe": "gattn_det_p2_tokens", "num_classes": 2})
    assert tokens(torch.randn(1, 3, 64, 64)).cls_logits[0].shape == (1, 2, 16, 16)


def test_config_keys_override_the_recipe() -> None:
    cfg = {"task": "det", "recipe": "gattn_det_p2_ppm_lk", "num_classes": 2, "min_level": 3}
    model = build_model({**cfg, "backbone_kwargs": TINY, "fpn_channels": 8})
    assert model.strides == (8, 16, 32) and model.fpn.channels == 8
    assert len(model.fpn.context[-1]) == 2  # the recipe's blocks stay
    with pytest.raises(ValueError, match="num_classes"):
        build_model({"task": "det", "recipe": "gattn_det_p2"})


def test_save_and_load_round_trip(tmp_path) -> None:
    cfg = {"task": "det", "recipe": "gattn_det_p2_tokens", "num_classes": 2}
    model = build_model(cfg).eval()
    loaded, _ = load_model(save_model(model, cfg, tmp_path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x).bbox_reg[0], model(x).bbox_reg[0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"min_level": 1}, r"min_level must be 2 .* or 3 .*set model\.min_level"),
        ({"global_modules": ["ppm", "pmm"]}, r"unknown block 'pmm' in global_modules.*ppm"),
        ({"global_at": "middle"}, r"global_at must be 'top' or 'all'"),
        (
            {"backbone": "gattn_vit_global", "backbone_kwargs": {}},
            r"'gattn_vit_global' gives .*strides \[8, 8, 8\].*ViT",
        ),
        ({"backbone": "gattn_det_p2"}, r"detector recipe, not a backbone.*'recipe'"),
        ({"recipe": "gattn_det_p5"}, r"unknown detector recipe 'gattn_det_p5'.*gattn_det_p2"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(tiny_cfg(**overrides))


def test_recipe_is_ignored_by_other_tasks() -> None:
    cfg = {"task": "cls", "recipe": "gattn_det_p2", "backbone": "gattn_local_cnn", "num_classes": 2}
    assert build_model(cfg)(torch.randn(1, 3, 32, 32)).shape == (1, 2)
