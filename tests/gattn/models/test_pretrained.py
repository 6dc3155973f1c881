"""The one pretrained-weight loader: names through wrappers, shapes, resampling, families."""

from __future__ import annotations

import pytest
import torch

from gattn.models import build_model
from gattn.models.pretrained import load_pretrained, same_backbone

VIT = {
    "backbone": "gattn_vit_global",
    "backbone_kwargs": {"embed_dim": 16, "depth": 2, "num_heads": 2, "patch_size": 8},
}
ENCODER = {"task": "cls", "num_classes": 0, "img_size": 32, **VIT}
SEG = {"task": "seg", "num_classes": 3, "img_size": 32, "head": "fcn", "head_channels": 8, **VIT}


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return build_model(ENCODER).state_dict()


def test_every_encoder_tensor_loads_through_features_only_and_injection_wrappers(
    weights: dict[str, torch.Tensor],
) -> None:
    """A ViT segmenter with global attention injected after block 1: the wrapped block's own
    tensors (``blocks.1.stage.*``) load too; only the pooled classifier's norm, which a
    ``features_only`` encoder has no use for, stays out."""
    cfg = {**SEG, "inject": [{"block": "global_attn", "stage": 2}]}
    model = build_model(cfg)
    report = load_pretrained(model, weights, source_cfg=ENCODER, target_cfg=cfg)
    assert report.prefix == "encoder.model."
    assert report.unexpected == ["fc_norm.bias", "fc_norm.weight"]
    assert len(report.matched) == len(weights) - 2
    wrapped = model.encoder.model.blocks[1].stage.attn.qkv.weight
    torch.testing.assert_close(wrapped, weights["blocks.1.attn.qkv.weight"], rtol=0, atol=0)
    assert {n.split(".")[0] for n in report.missing} == {"encoder", "head"}
    assert all(".injected." in n or n.startswith("head.") for n in report.missing)


def test_position_embedding_is_resampled_and_shape_mismatches_are_reported(
    weights: dict[str, torch.Tensor],
) -> None:
    bigger = build_model({**SEG, "img_size": 48})
    report = load_pretrained(bigger, weights)
    assert report.resampled == ["encoder.model.pos_embed"]
    patch = bigger.encoder.model.patch_embed.patch_size[0]
    assert bigger.state_dict()["encoder.model.pos_embed"].shape[1] == (48 // patch) ** 2

    wider = {
        **ENCODER,
        "num_classes": 3,
        "backbone_kwargs": {**VIT["backbone_kwargs"], "mlp_ratio": 2.0},
    }
    cls = build_model(wider)
    report = load_pretrained(cls, weights)
    assert "blocks.0.mlp.fc1.weight" in report.shape_mismatch
    assert "blocks.0.attn.qkv.weight" in report.matched and "head.weight" in report.missing


def test_another_backbone_loads_nothing(weights: dict[str, torch.Tensor]) -> None:
    cnn = {"task": "seg", "num_classes": 3, "backbone": "gattn_local_cnn", "head": "fcn"}
    model = build_model(cnn)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, weights, source_cfg=ENCODER, target_cfg=cnn)
    assert report.matched == [] and "gattn_local_cnn" in report.skipped
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert same_backbone(ENCODER, SEG) and not same_backbone(ENCODER, cnn)
    assert not same_backbone(ENCODER, {**ENCODER, "backbone_kwargs": {"embed_dim": 32}})
