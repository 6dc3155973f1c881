"""``gattn explain``: rollout for transformers, Grad-CAM for CNNs, overlays written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gattn.models import build_model, save_model
from pipelines.cli import main
from pipelines.commands.explain import explain

VIT = {
    "task": "cls",
    "backbone": "gattn_vit_global",
    "num_classes": 2,
    "img_size": 32,
    "backbone_kwargs": {"embed_dim": 16, "depth": 2, "num_heads": 2},
}
CNN = {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 3, "head": "fcn"}


def folder(root: Path, cfg: dict) -> Path:
    torch.manual_seed(0)
    classes = [f"c{i}" for i in range(cfg["num_classes"])]
    return save_model(build_model(cfg), cfg, root, task=cfg["task"], classes=classes, img_size=32)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "scene.png"
    Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_rollout_for_a_vit_and_gradcam_for_a_cnn(tmp_path: Path, image: Path) -> None:
    vit = folder(tmp_path / "vit", VIT)
    out = explain(image, vit, out=tmp_path / "vit.png")
    assert out["method"] == "rollout" and out["class"] in ("c0", "c1")
    assert Image.open(tmp_path / "vit.png").size[0] > 100
    out = explain(image, vit, method="gradcam", target=1, out=tmp_path / "vit_cam.png")
    assert out == {
        "out": str(tmp_path / "vit_cam.png"),
        "method": "grad_cam",
        "target": 1,
        "class": "c1",
    }

    cnn = folder(tmp_path / "cnn", CNN)
    out = explain(image, cnn, method="gradcam", target=2, out=tmp_path / "cnn.png")
    assert out["method"] == "grad_cam" and out["class"] == "c2"
    assert (tmp_path / "cnn.png").stat().st_size > 1000


def test_cli_writes_the_overlay_and_reports_bad_input(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture
) -> None:
    cnn = folder(tmp_path / "cnn", CNN)
    png = tmp_path / "out.png"
    assert main(["explain", str(image), "--model", str(cnn), "--out", str(png)]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(png) and png.is_file()

    assert main(["explain", str(tmp_path / "none.png"), "--model", str(cnn)]) == 2
    assert "no such image" in capsys.readouterr().err
    assert main(["explain", str(image), "--model", str(cnn), "--method", "rollout"]) == 2
    assert "rollout" in capsys.readouterr().err
    assert main(["explain", str(image), "--model", str(tmp_path / "nomodel")]) == 2
    assert "not a model folder" in capsys.readouterr().err
