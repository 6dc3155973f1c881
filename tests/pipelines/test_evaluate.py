"""The evaluate stage: every mode is scored, metrics agree with a direct count, all is logged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from gattn.data.views import seg_eval_transform
from gattn.models import build_model, save_model
from pipelines.cli import main
from pipelines.config import EvaluateParams, Params
from pipelines.data import open_split
from pipelines.stages.evaluate import evaluate, fixed_input_size, runners
from pipelines.stages.prepare import prepare

SEG = {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 4, "head": "fcn"}
CLS = {"task": "cls", "backbone": "gattn_local_cnn", "num_classes": 2}


def prepared_data(root: Path, task: str) -> Path:
    data = {
        "task": task,
        "num_samples": 12,
        "image_size": 32,
        "large": {"num_samples": 2, "image_size": 80},
        "grid_samples": 2,
    }
    prepare(Params.model_validate({"data": data}), root / "prepared", root / "reports")
    return root / "prepared"


def model_folder(root: Path, cfg: dict, prepared: Path) -> Path:
    torch.manual_seed(0)
    classes = json.loads((prepared / "splits.json").read_text())["classes"]
    assert len(classes) == cfg["num_classes"]
    meta = {"task": cfg["task"], "classes": classes, "img_size": 32, "metric": "miou"}
    return save_model(build_model(cfg).eval(), cfg, root / "model", **meta)


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("seg")
    prepared = prepared_data(root, "cue-seg")
    return prepared, model_folder(root, SEG, prepared)


@pytest.mark.slow
def test_cli_scores_every_mode_and_logs_to_mlflow(tmp_path: Path, seg_setup) -> None:
    prepared, model_dir = seg_setup
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"evaluate": {"erf_images": 2, "tta_scales": [1.0, 1.5]}}))
    reports = tmp_path / "reports"
    args = ["--params", str(params), "--model", str(model_dir), "--data", str(prepared)]
    assert main(["evaluate", *args, "--reports", str(reports)]) == 0

    metrics = json.loads((reports / "metrics.json").read_text())
    modes = ["resize", "whole", "sliding", "sliding_global"]
    expected = ["test.plain", *(f"large.{m}" for m in modes)]
    assert sorted(k for k in metrics if k != "erf") == sorted(
        expected + [f"{k}_tta" for k in expected]
    )
    for key in expected:
        assert 0 <= metrics[key]["accuracy"] <= 1 and metrics[key]["ms_per_image"] > 0
    erf = metrics["erf"]
    assert 0 < erf["area_20"] <= erf["area_50"] <= erf["area_99"] <= 1

    # Pixel accuracy of the plain pass, counted directly.
    torch.manual_seed(0)
    model = build_model(SEG).eval()  # the weights of model_folder
    test = open_split("test", prepared, seg_eval_transform(32))
    right = total = 0
    with torch.no_grad():
        for image, mask in test:
            pred = model(image[None]).argmax(1)[0]
            valid = mask != 255
            right += int((pred[valid] == mask[valid]).sum())
            total += int(valid.sum())
    assert metrics["test.plain"]["accuracy"] == pytest.approx(right / total, abs=1e-6)

    with open(reports / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected) * 2
    with open(reports / "per_class_iou.csv") as f:
        per_class = list(csv.DictReader(f))
    assert len(per_class) == len(rows) * 4
    for png in ("confusion_test.png", "confusion_large.png", "erf.png"):
        assert (reports / png).stat().st_size > 1000
    details = json.loads((reports / "details.json").read_text())
    confusion = np.array(details["results"]["test/plain"]["confusion"])
    assert confusion.sum() == total

    run = mlflow.search_runs(experiment_names=["gattn"], output_format="list")[0]
    assert run.data.metrics["test.plain.accuracy"] == pytest.approx(right / total)
    assert run.data.metrics["erf.area_50"] == pytest.approx(erf["area_50"])


def test_classifier_is_scored_on_resized_large_images(tmp_path: Path) -> None:
    prepared = prepared_data(tmp_path, "pathfinder")
    model_dir = model_folder(tmp_path, CLS, prepared)
    p = EvaluateParams(erf_images=2, tta_scales=(1.0,))
    out = evaluate(p, model_dir, prepared, tmp_path / "reports")
    assert sorted(k for k in out["metrics"] if k != "erf") == [
        "large.resize",
        "large.resize_tta",
        "test.plain",
        "test.plain_tta",
    ]
    # One scale, flip on: a classifier's TTA accuracy is a real number of images.
    n = len(open_split("test", prepared))
    assert round(out["metrics"]["test.plain"]["accuracy"] * n, 6).is_integer()


def test_modes_follow_what_the_model_accepts() -> None:
    p = EvaluateParams()
    seg = build_model(SEG).eval()
    assert list(runners(seg, "seg", 32, p, large=True)) == [
        "resize",
        "whole",
        "sliding",
        "sliding_global",
    ]
    vit = build_model(
        {
            "task": "seg",
            "backbone": "gattn_vit_global",
            "num_classes": 3,
            "img_size": 32,
            "backbone_kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2},
        }
    ).eval()
    assert fixed_input_size(vit) and not fixed_input_size(seg)
    assert "whole" not in runners(vit, "seg", 32, p, large=True)
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))
    assert list(runners(plain, "seg", 32, p, large=True)) == ["resize", "whole", "sliding"]


DET = {"task": "det", "recipe": "gattn_det_p2_ppm_lk", "num_classes": 3}


@pytest.fixture(scope="module")
def det_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tiny-det at 64 px (a few images, one large one at 128 px) and an untrained detector
    saved as the finetune stage saves models."""
    root = tmp_path_factory.mktemp("det")
    data = {
        "task": "tiny-det",
        "num_samples": 10,
        "image_size": 64,
        "large": {"num_samples": 1, "image_size": 128},
        "grid_samples": 2,
    }
    prepare(Params.model_validate({"data": data}), root / "prepared", root / "reports")
    torch.manual_seed(0)
    classes = json.loads((root / "prepared" / "splits.json").read_text())["classes"]
    meta = {"task": "det", "classes": classes, "img_size": 64, "metric": "map"}
    return root / "prepared", save_model(build_model(DET).eval(), DET, root / "model", **meta)


@pytest.mark.slow
def test_detector_is_scored_on_boxes_plain_tta_and_sliding(tmp_path: Path, det_setup) -> None:
    prepared, model_dir = det_setup
    params = tmp_path / "params.yaml"
    section = {"erf_images": 2, "tta_scales": [1.0], "batch_size": 4}
    params.write_text(json.dumps({"evaluate": section}))
    reports = tmp_path / "reports"
    args = ["--params", str(params), "--model", str(model_dir), "--data", str(prepared)]
    assert main(["evaluate", *args, "--reports", str(reports)]) == 0

    modes = ["resize", "whole", "sliding", "sliding_global"]
    expected = ["test.plain", *(f"large.{m}" for m in modes)]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert sorted(k for k in metrics if k != "erf") == sorted(
        expected + [f"{k}_tta" for k in expected]
    )
    figures = ("map", "map_50", "map_small", "map_medium")
    for key in expected + [f"{k}_tta" for k in expected]:
        assert set(metrics[key]) == {*figures, "ms_per_image"}
        for name in ("map", "map_50", "map_small"):  # tiny-det's objects are all small
            assert 0 <= metrics[key][name] <= 1, (key, name, metrics[key][name])
        assert metrics[key]["ms_per_image"] > 0
    assert 0 < metrics["erf"]["area_20"] <= metrics["erf"]["area_99"] <= 1
    run = mlflow.search_runs(experiment_names=["gattn"], output_format="list")[0]
    logged = run.data.metrics["large.sliding_global_tta.map_50"]
    assert logged == pytest.approx(metrics["large.sliding_global_tta"]["map_50"])

    with open(reports / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 10 and set(figures) <= set(rows[0])
    with open(reports / "per_class_ap.csv") as f:
        assert len(list(csv.DictReader(f))) == 10 * 3
    details = json.loads((reports / "details.json").read_text())
    assert details["task"] == "det" and 0 <= details["results"]["test/plain"]["mar_100"] <= 1
    for png in ("detections.png", "confusion_test.png", "confusion_large.png", "erf.png"):
        assert (reports / png).stat().st_size > 1000
    assert (reports / "per_class_iou.csv").read_text().strip() == "label,set_mode,class,iou"
