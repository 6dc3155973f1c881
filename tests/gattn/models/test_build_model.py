"""build_model: classifiers and segmenters from a plain dict, with errors that list options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gattn.models import (
    HEADS,
    InjectedStage,
    NLHead,
    PSPHead,
    Segmenter,
    build_model,
    config_keys,
)
from gattn.modules.non_local import NonLocalBlock

TINY_RESNET = {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64)}


def test_classifier_with_injection() -> None:
    model = build_model(
        {
            "backbone": "resnet18",
            "num_classes": 4,
            "img_size": 64,  # ignored by the fully convolutional ResNet
            "inject": "nonlocal@3",
            "dropout": 0.2,
            "head": "psp",  # a segmentation key: ignored for classification
            "backbone_kwargs": TINY_RESNET,
        }
    )
    assert isinstance(model.layer3, InjectedStage)
    assert isinstance(model.layer3.injected[0], NonLocalBlock)
    assert model.drop_rate == 0.2
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 4)


def test_segmenter_on_odd_size_trains_at_batch_1() -> None:
    model = build_model(
        {
            "task": "seg",
            "backbone": "resnet18",
            "num_classes": 3,
            "inject": "nonlocal@3",
            "head": "nonlocal",
            "head_channels": 16,
            "backbone_kwargs": TINY_RESNET,
        }
    )
    assert isinstance(model, Segmenter) and isinstance(model.head, NLHead)
    assert isinstance(model.encoder.layer3, InjectedStage)
    x = torch.randn(1, 3, 37, 53)
    logits = model(x)
    assert logits.shape == (1, 3, 37, 53)
    nn.functional.cross_entropy(logits, torch.randint(0, 3, (1, 37, 53))).backward()
    assert model.encoder.layer3.injected[0].norm.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (1, 64, 2, 2)
        ctx = model.encode_context(x)
        torch.testing.assert_close(ctx, feat.mean(dim=(2, 3)))
        nn.init.normal_(model.head.context_proj.weight)
        assert not torch.allclose(model(x, ctx), model(x))


def test_segmenter_on_channels_last_swin_encoder() -> None:
    model = build_model(
        {
            "task": "seg",
            "backbone": "gattn_swin_global_tokens",
            "num_classes": 2,
            "img_size": 32,
            "head": "psp",
            "head_channels": 8,
            "backbone_kwargs": {"embed_dim": 8, "depths": (1, 1, 1, 1)},
        }
    ).eval()
    assert isinstance(model.head, PSPHead) and model.head.in_channels == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        (nhwc,) = model.encoder(x)
        torch.testing.assert_close(model.forward_features(x), nhwc.permute(0, 3, 1, 2))
        assert model(x).shape == (2, 2, 32, 32)


def test_segmenter_on_vit_tokens() -> None:
    model = build_model(
        {
            "task": "seg",
            "backbone": "gattn_vit_global",
            "num_classes": 2,
            "img_size": 32,
            "inject": "ppm@2",
            "head": "deeplabv3",
            "head_kwargs": {"rates": (1, 2)},
            "backbone_kwargs": {"embed_dim": 16, "depth": 2, "num_heads": 2},
        }
    )
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 16, 4, 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"backbone": "resnet18", "num_classes": 2, "lr": 1}, r"unknown model key\(s\) \['lr'\]"),
        ({"backbone": "resnet18", "num_classes": 2, "task": "pose"}, "valid tasks: cls, seg, det"),
        ({"num_classes": 2}, r"missing key\(s\) \['backbone'\]"),
        ({"backbone": "resnet81", "num_classes": 2}, "did you mean.*'resnet18'.*gattn_local_cnn"),
        (
            {"backbone": "resnet18", "num_classes": 2, "task": "seg", "head": "unet"},
            f"valid heads: {', '.join(HEADS)}",
        ),
        ({"backbone": "resnet18", "num_classes": 2, "inject": "foo@3"}, "valid blocks: .*nonlocal"),
    ],
)
def test_build_model_errors_list_valid_options(cfg: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        build_model(cfg)
    if "lr" in cfg:
        for key in ("backbone", "head", "head_channels", "inject", "img_size", "task"):
            assert key in str(err.value)


def test_config_keys_are_the_builders_keywords() -> None:
    assert set(config_keys()) == {
        "task",
        "backbone",
        "num_classes",
        "in_chans",
        "img_size",
        "inject",
        "head",
        "head_channels",
        "dropout",
        "pretrained",
        "backbone_kwargs",
        "head_kwargs",
        # detection
        "recipe",
        "min_level",
        "max_level",
        "fpn_channels",
        "global_modules",
        "global_at",
    }
