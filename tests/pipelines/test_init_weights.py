"""Where models start: ``finetune.init`` and each tune family's ``init`` (scratch, ssl, hub,
a weights file, a named file), checked in params.yaml and loaded into a trial's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gattn.models import build_model
from pipelines.config import (
    DEFAULT_FAMILIES,
    WEIGHT_SUFFIXES,
    FinetuneParams,
    ParamsError,
    TuneParams,
    load_params,
)
from pipelines.init_weights import init_fingerprint, resolve_init
from pipelines.stages.tune import space, stage, trial

ROOT = Path(__file__).resolve().parents[2]
VIT = {"embed_dim": 16, "depth": 2, "num_heads": 2, "patch_size": 8}
SAMPLE = {
    "module": "se",
    "module_size": "small",
    "attn_impl": "fused",
    "position": "last",
    "num_blocks": 1,
    "head": "fcn",
    "batch_size": 4,
    "img_size": 32,
    "lr": 1e-3,
}


def test_init_values_are_checked_in_params_yaml(tmp_path: Path) -> None:
    params = load_params(ROOT / "params.yaml")
    assert params.finetune.init == "trial"
    assert {k: f.init for k, f in params.tune.families.items()} == {
        "cnn": "scratch",
        "swin": "scratch",
        "vit": "ssl",
    }
    assert {k: f.init for k, f in TuneParams().families.items()} == {
        k: v["init"] for k, v in DEFAULT_FAMILIES.items()
    }
    for ok in ("ssl", "hub", "scratch", "mobilenetv2_100.tv_in1k", "w/x.pth", "w.safetensors"):
        assert FinetuneParams(init=ok).init == ok
    with pytest.raises(ValueError, match="renamed 'ssl'"):
        FinetuneParams(init="pretrained")
    with pytest.raises(ValueError, match=r"expected trial \| scratch \| ssl \| hub"):
        FinetuneParams(init="scracth")
    with pytest.raises(ValueError, match=r"expected scratch \| ssl \| hub"):
        TuneParams.model_validate({"families": {"m": {"backbone": "resnet18", "init": "trial"}}})
    path = tmp_path / "params.yaml"
    path.write_text("tune:\n  pretrained: true\n")
    with pytest.raises(ParamsError, match=r"tune.pretrained: removed.*families.<name>.init: ssl"):
        load_params(path)


def test_weight_suffixes_agree_with_the_reader() -> None:
    from gattn.models.pretrained import WEIGHT_SUFFIXES as READ

    assert WEIGHT_SUFFIXES == READ  # config.py cannot import torch: one list, twice


@pytest.fixture(scope="module")
def mobilenet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torchvision's MobileNetV2 layout (random init, saved with ``torch.save``), as the
    ImageNet file is; needs no package."""
    from torchvision.models import mobilenet_v2

    path = tmp_path_factory.mktemp("tv") / "mobilenet_v2.pth"
    torch.manual_seed(0)
    torch.save(mobilenet_v2(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain-stage folder: a ViT encoder and the config that rebuilds it."""
    out = tmp_path_factory.mktemp("pretrained")
    cfg = {"task": "cls", "backbone": "gattn_vit_global", "backbone_kwargs": VIT}
    cfg |= {"num_classes": 0, "img_size": 32}
    torch.manual_seed(1)
    weights = build_model(cfg).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "encoder.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": cfg}))
    return out


def families(mobilenet: str) -> dict:
    return {
        "cnn": {"backbone": "gattn_local_cnn", "backbone_kwargs": {"widths": [8, 16]}},
        "vit": {"backbone": "gattn_vit_global", "backbone_kwargs": VIT},  # init: ssl (default)
        "mobilenet": {"backbone": "mobilenetv2_100", "init": mobilenet},
    }


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_each_family_starts_from_its_init(
    task: str, mobilenet_file: Path, encoder: Path, prepared: Path
) -> None:
    """A ``mobilenet`` family from an ImageNet-layout file (its 1000-class classifier left out,
    not an error), the ViT family from the ssl encoder, the CNN family (ssl by default, another
    backbone) from scratch; the sweep's context reads each source once."""
    p = TuneParams.model_validate({"families": families(str(mobilenet_file))})
    context = stage.data_context(prepared, encoder, p, seed=0)
    assert context.inits["cnn"] is context.inits["vit"]  # one ssl source
    loaded = {}
    for family in ("mobilenet", "vit", "cnn"):
        cfg = space.model_config({**SAMPLE, "family": family}, p, task, 4, 3)
        row: dict = {}
        trial.build_trial_model(cfg, context, torch.device("cpu"), row, family)
        loaded[family] = row["pretrained_tensors"]
    # 314 tensors: cls leaves out the classifier (2), seg a features_only encoder also the
    # final 1x1 conv and its norm (8 in all).
    assert loaded["mobilenet"] == (312 if task == "cls" else 306)
    assert loaded["vit"] > 0 and loaded["cnn"] == 0
    report = resolve_init("ssl", "gattn_local_cnn", None, require_encoder=False)
    assert report.weights is None and "from scratch" in report.note  # before pretrain ran


def test_a_missing_family_file_fails_before_the_sweep(tmp_path: Path, prepared: Path) -> None:
    p = TuneParams.model_validate({"families": families(str(tmp_path / "nope.pth"))})
    with pytest.raises(FileNotFoundError, match=r"nope.pth.*no such weights file"):
        stage.data_context(prepared, None, p, seed=0)


def test_fingerprints_follow_the_weights(mobilenet_file: Path, encoder: Path) -> None:
    assert init_fingerprint("scratch", "x", None) == "scratch"
    ssl = init_fingerprint("ssl", "gattn_vit_global", encoder)
    file = init_fingerprint(str(mobilenet_file), "mobilenetv2_100", None)
    assert len({ssl, file}) == 2 and file.startswith("file-")
