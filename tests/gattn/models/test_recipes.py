"""The gattn_* recipes build through timm.create_model, train, and hold the article's blocks."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import gattn.models  # noqa: F401  (registers the recipes)
from gattn.models import InjectedStage, LocalCNN, inject, model_stages, receptive_field
from gattn.modules.global_tokens import GlobalTokenAttention
from gattn.modules.non_local import NonLocalBlock
from gattn.modules.pyramid_pooling import PyramidPoolingModule
from gattn.modules.squeeze_excite import SEBlock

RECIPES = [
    "gattn_local_cnn",
    "gattn_resnet_global_tiny",
    "gattn_swin_global_tokens",
    "gattn_vit_global",
]


def test_every_recipe_is_registered() -> None:
    assert set(RECIPES) | {"gattn_resnet_global"} <= set(timm.list_models("gattn_*"))


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_and_has_features_only(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)
    assert logits.shape == (2, 3)
    nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.pretrained_cfg["architecture"] == name

    features = timm.create_model(name, features_only=True)
    maps = features(x[:1])
    assert [m.shape[-1] if name.startswith("gattn_swin") else m.shape[1] for m in maps] == (
        features.feature_info.channels()
    )


def test_resnet_global_holds_recipe_1() -> None:
    model = timm.create_model("gattn_resnet_global_tiny")
    assert [s.channels for s in model_stages(model)] == [16, 32, 64, 128]
    assert isinstance(model.layer3, InjectedStage) and isinstance(model.layer4, InjectedStage)
    (nl,) = model.layer3.injected
    assert isinstance(nl, NonLocalBlock) and nl.theta.in_channels == 64
    assert [type(b) for b in model.layer4.injected] == [PyramidPoolingModule, SEBlock]
    assert model.layer4.injected[1].fc2.out_channels == 128
    assert not isinstance(model.layer2, InjectedStage)
    sized = timm.create_model("gattn_resnet_global_tiny", img_size=48, in_chans=1)
    assert sized.pretrained_cfg["input_size"] == (1, 48, 48)  # fully convolutional: cfg only


def test_swin_global_tokens_have_each_stage_width() -> None:
    model = timm.create_model("gattn_swin_global_tokens", embed_dim=24, num_global_tokens=3)
    widths = [s.channels for s in model_stages(model)]
    assert widths == [24, 48, 96, 192]
    attns = [m for m in model.modules() if isinstance(m, GlobalTokenAttention)]
    assert [tuple(a.global_tokens.shape) for a in attns] == [(1, 3, w) for w in widths]
    for i, attn in enumerate(attns):
        assert attn in model.layers[i].modules()


def test_vit_global_is_mae_ready() -> None:
    model = timm.create_model("gattn_vit_global", img_size=48)
    assert model.num_prefix_tokens == 0
    assert tuple(model.patch_embed.patch_size) == (8, 8)
    assert tuple(model.patch_embed.grid_size) == (6, 6)
    assert model.forward_features(torch.randn(1, 3, 48, 48)).shape == (1, 36, 96)
    assert model.pretrained_cfg["input_size"] == (3, 48, 48)


@pytest.mark.parametrize("name", RECIPES + ["gattn_resnet_global"])
def test_recipes_have_no_pretrained_weights(name: str) -> None:
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize(("widths", "convs"), [((8, 8), 2), ((4, 4, 4), 1), ((4,), 3)])
def test_local_cnn_receptive_field_matches_its_gradient_support(widths, convs) -> None:
    torch.manual_seed(0)
    model = LocalCNN(num_classes=0, widths=widths, convs_per_stage=convs, act_layer=nn.Identity)
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    feat = model.eval().forward_features(x)
    center = feat.shape[-1] // 2
    feat[0, :, center, center].sum().backward()
    rows = x.grad[0].abs().sum(dim=(0, 2)).nonzero()
    assert rows.max() - rows.min() + 1 == receptive_field(len(widths), convs)
    assert receptive_field(2, 2) == 19  # the documented default


def test_local_baseline_takes_a_global_block() -> None:
    model = timm.create_model("gattn_local_cnn", num_classes=2, widths=(8, 16))
    assert [(s.path, s.channels, s.reduction) for s in model_stages(model)] == [
        ("stages.0", 8, 2),
        ("stages.1", 16, 4),
    ]
    inject(model, "nonlocal@2")
    assert isinstance(model.stages[1], InjectedStage)
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 2)
