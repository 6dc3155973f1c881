"""Detection in the training stages (issue 18): a tune trial, ssl init into a detector, the
pretrain probe's image-level label, and finetune writing a detector that loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gattn.models import Detector, build_model, load_model
from pipelines.config import FinetuneParams, Params, ParamsError, PretrainParams, TuneParams
from pipelines.init_weights import apply_init, resolve_init
from pipelines.stages.pretrain import ENCODER, encoder_config, image_label, probe_sets
from pipelines.stages.tune.stage import data_context
from pipelines.stages.tune.trial import run_trial

RESNET = {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}  # the gattn_det_* backbone
DET = {"task": "det", "recipe": "gattn_det_p2", "num_classes": 3, "in_chans": 3, "img_size": 64}


@pytest.fixture(scope="module")
def tiny_det(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-det prepared at 64 px (GroupNorm needs FPN maps over 1x1), 24 images."""
    from pipelines.stages.prepare import prepare

    root = tmp_path_factory.mktemp("tiny-det")
    data = {"task": "tiny-det", "num_samples": 24, "image_size": 64, "large": {"num_samples": 0}}
    tune = {"families": {"p2": {"backbone": "gattn_det_p2"}}}
    prepare(Params.model_validate({"data": data, "tune": tune}), root / "prepared", root / "r")
    return root / "prepared"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretrain-stage folder holding a seeded encoder of the detector recipes' backbone."""
    out = tmp_path_factory.mktemp("pretrained")
    cfg = encoder_config(PretrainParams(method="dino", backbone="resnet18", backbone_kwargs=RESNET))
    torch.manual_seed(5)
    state = build_model(cfg).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / ENCODER))
    (out / "config.json").write_text(json.dumps({"model": cfg}))
    return out


def test_tune_trial_trains_a_detector_and_its_memory_estimate_holds(tiny_det: Path) -> None:
    p = TuneParams(
        families={"p2": {"backbone": "gattn_det_p2", "init": "scratch"}},
        budgets_gib=(1.0,),
        epochs=1,
        grace_period=1,
        batch_sizes=(4,),
        img_sizes=(64,),
        max_val_samples=8,
    )
    with pytest.raises(ParamsError, match=r"tune\.families\.cnn\.backbone.*detector recipe"):
        data_context(tiny_det, None, TuneParams(), 0)  # params.yaml's backbones, not recipes
    context = data_context(tiny_det, None, p, 0)
    assert context.kind == "det" and context.class_weight is None  # the detector takes none
    reports: list[dict] = []
    row = run_trial(
        {"family": "p2", "batch_size": 4, "img_size": 64, "lr": 3e-3}, context, reports.append
    )
    assert row["status"] == "ok", row.get("traceback")
    assert row["metric"] == "map" and 0.0 <= row["quality"] <= 1.0 and row["steps"] >= 2
    assert row["model"]["recipe"] == "gattn_det_p2"
    assert row["estimated_memory_gib"] == pytest.approx(row["peak_memory_gib"], rel=0.15)


def test_ssl_init_loads_the_encoder_into_the_detector_backbone(encoder: Path) -> None:
    model = build_model(DET)
    assert isinstance(model, Detector)
    report = apply_init(model, DET, resolve_init("ssl", "resnet18", encoder, require_encoder=True))
    assert report.prefix == "encoder." and not report.skipped and not report.shape_mismatch
    assert len(report.matched) == len(model.encoder.state_dict())
    assert all(n.startswith(("fpn.", "head.", "context_proj.")) for n in report.missing)
    other = {**DET, "backbone_kwargs": {"layers": [2, 2, 2, 2]}}  # another backbone: nothing
    initial = resolve_init("ssl", "resnet18", encoder, require_encoder=True)
    assert apply_init(build_model(other), other, initial).skipped


def test_pretrain_probe_labels_are_the_most_frequent_box_label(tiny_det: Path) -> None:
    labels = torch.tensor([2, 1, 2, 0])
    assert int(image_label({"boxes": torch.zeros(4, 4), "labels": labels})) == 2
    assert int(image_label({"boxes": torch.zeros(0, 4), "labels": labels[:0]})) == 0
    train, query, num_classes = probe_sets(PretrainParams(img_size=32), tiny_det)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and label.ndim == 0 and 0 <= int(label) < num_classes == 3


def test_finetune_trains_a_detector_that_loads_back(
    tmp_path: Path, tiny_det: Path, encoder: Path, ray_local: None
) -> None:
    from pipelines.stages.finetune import finetune
    from tests.pipelines.test_finetune import best_json

    best = best_json(tmp_path / "best.json", DET)
    p = FinetuneParams(
        init="ssl", epochs=1, warmup_epochs=0.0, cpus_per_worker=1, num_workers=0,
        max_val_samples=8, search_tolerance=None, storage=str(tmp_path / "ray"),
    )  # fmt: skip
    out = finetune(p, 0, best, encoder, tiny_det, tmp_path / "model", tmp_path / "reports")
    assert out["metrics"]["metric"] == "map" and out["metrics"]["pretrained_matched"] > 0
    assert "val_map_50" in (tmp_path / "reports" / "history.csv").read_text()
    model, config = load_model(tmp_path / "model")
    assert isinstance(model, Detector) and config["task"] == "det"
    model.eval()
    (found,) = model.predict(torch.rand(1, 3, 64, 64))
    assert found["boxes"].shape[-1] == 4


def test_window_view_boxes_matches_torchvision_resized_crop() -> None:
    """The global-feedback window of a detection batch cuts images and boxes as torchvision's
    ``resized_crop`` + clamp + 1 px sanitising does (the independent reference)."""
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as TF

    from pipelines.stages.finetune import _window, window_view_boxes

    size, scale = (48, 64), (0.1, 0.5)
    images = torch.rand(2, 3, *size)
    boxes = torch.tensor([[0, 0, 10, 10], [20, 5, 40, 30], [50, 40, 64, 48], [30, 20, 33, 23.0]])
    targets = [
        {"boxes": boxes, "labels": torch.tensor([0, 1, 2, 1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)},
    ]
    kept, dropped = 0, 0
    for seed in range(8):
        crop, views = window_view_boxes(images, targets, scale, torch.Generator().manual_seed(seed))
        x, y, w, h = _window(size, scale, torch.Generator().manual_seed(seed))
        ref_images = TF.resized_crop(images, y, x, h, w, list(size), antialias=False)
        torch.testing.assert_close(crop, ref_images)
        for target, view in zip(targets, views, strict=True):
            bb = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=size)
            ref = TF.clamp_bounding_boxes(TF.resized_crop(bb, y, x, h, w, list(size)))
            ref = ref.as_subclass(torch.Tensor)
            keep = ((ref[:, 2] - ref[:, 0]) >= 1) & ((ref[:, 3] - ref[:, 1]) >= 1)
            torch.testing.assert_close(view["boxes"], ref[keep])
            assert torch.equal(view["labels"], target["labels"][keep])
            kept, dropped = kept + int(keep.sum()), dropped + int((~keep).sum())
    assert kept and dropped  # the windows both kept and cut away boxes


def test_finetune_trains_the_detectors_context_projection(
    tmp_path: Path, tiny_det: Path, encoder: Path
) -> None:
    """``context_crop``: a detector sees a window while its context comes from the whole
    image, so its zero-initialised context projection gets a gradient (it would stay unused)."""
    from gattn.data import collate_detection
    from pipelines.stages.finetune import FinetuneHooks, load_best, loop_config
    from tests.pipelines.test_finetune import best_json

    entry = load_best(best_json(tmp_path / "best.json", DET))[2]
    for share, trained in ((1.0, True), (0.0, False)):
        p = FinetuneParams(init="scratch", context_crop=share, storage=str(tmp_path / "ray"))
        hooks = FinetuneHooks(loop_config(p, 0, entry, encoder, tiny_det))
        model, train, _ = hooks.build()
        assert hooks.use_context is trained
        batch = collate_detection([train[i] for i in range(4)])
        hooks.loss(model, batch, 0, 0)[0].backward()
        grad = model.context_proj.weight.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) is trained
