"""The MLflow Model Registry round trip: safetensors + config in, the same outputs out."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from gattn.models import build_model, load_model, save_model
from pipelines import tracking
from pipelines.registry import register, resolve_model

CFG = {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 3, "head": "fcn"}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(CFG)
    return save_model(model, CFG, tmp_path / "model", classes=["bg", "a", "b"], img_size=32)


@pytest.mark.slow
def test_register_resolve_round_trip_gives_identical_outputs(tmp_path: Path, model_dir: Path):
    original, _ = load_model(model_dir)
    x = torch.rand(2, 3, 40, 36)
    with torch.no_grad():
        expected = original(x)
    with tracking.stage_run("finetune", {}, "gattn", root=tmp_path) as run:
        assert register(model_dir, "tiny") == 1
        assert register(model_dir, "tiny") == 2
    client = mlflow.MlflowClient()
    assert int(client.get_model_version_by_alias("tiny", "champion").version) == 2
    assert client.get_model_version("tiny", "1").run_id == run.info.run_id

    cache = tmp_path / "cache"
    local = resolve_model("models:/tiny@champion", cache_dir=cache)
    assert local.is_relative_to(cache)
    model, cfg = load_model(local)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert cfg["classes"] == ["bg", "a", "b"] and cfg["img_size"] == 32
    assert cfg["registered"] == {"name": "tiny", "version": 2}
    assert sorted(p.name for p in local.iterdir()) == ["config.json", "model.safetensors"]

    # A version number works too; a second resolve reuses the download.
    v1 = resolve_model("models:/tiny/1", cache_dir=cache)
    assert (
        v1 != local and json.loads((v1 / "config.json").read_text())["registered"]["version"] == 1
    )
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("models:/tiny@champion", cache_dir=cache) == local
    assert (local / "model.safetensors").stat().st_mtime_ns == stamp

    # The pyfunc (models from code) predicts the same logits; nothing pickled is stored.
    pyfunc = mlflow.pyfunc.load_model("models:/tiny@champion")
    np.testing.assert_array_equal(pyfunc.predict(x.numpy()), expected.numpy())
    stored = Path(
        mlflow.artifacts.download_artifacts("models:/tiny/2", dst_path=str(tmp_path / "raw"))
    )
    suffixes = {p.suffix for p in stored.rglob("*") if p.is_file()}
    assert not suffixes & {".pkl", ".pickle", ".pt", ".pth", ".joblib"}
    assert (stored / "pyfunc_model.py").is_file()

    with pytest.raises(FileNotFoundError, match="gattn finetune"):
        resolve_model("models:/missing@champion", cache_dir=cache)

    # An explicit store is honoured even when the process's default store is another one
    # (a Serve replica or a client pointed elsewhere).
    store = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        elsewhere = resolve_model("models:/tiny/1", cache_dir=tmp_path / "cache2", store=store)
    finally:
        mlflow.set_tracking_uri(store)
    with torch.no_grad():
        torch.testing.assert_close(load_model(elsewhere)[0](x), load_model(v1)[0](x))


def test_resolve_checks_paths_and_uris(tmp_path: Path, model_dir: Path):
    assert resolve_model(model_dir) == model_dir
    assert resolve_model(str(model_dir)) == model_dir
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        resolve_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="models:/NAME@ALIAS"):
        resolve_model("models:/a/b/c")


@pytest.mark.slow
def test_detector_pyfunc_returns_padded_detections(tmp_path: Path):
    """A registered detector's pyfunc answers the detections of ``Detector.predict``, padded
    to a fixed ``(B, MAX_DETECTIONS, 6)``, as its signature declares."""
    from pipelines.pyfunc_model import MAX_DETECTIONS
    from pipelines.registry import signature

    cfg = {"task": "det", "recipe": "gattn_det_p2", "num_classes": 2, "img_size": 64}
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a head biased to fire, so that some boxes pass the threshold
        for m in model.modules():
            if hasattr(m, "cls_logits") and isinstance(m.cls_logits, torch.nn.Conv2d):
                m.cls_logits.bias.fill_(2.0)
    folder = save_model(model, cfg, tmp_path / "det", classes=["a", "b"], img_size=64)
    loaded, saved = load_model(folder)
    x = torch.rand(2, 3, 64, 64)
    expected = loaded.predict(x, max_det=MAX_DETECTIONS)
    with tracking.stage_run("finetune", {}, "gattn", root=tmp_path):
        register(folder, "det")
    out = mlflow.pyfunc.load_model("models:/det@champion").predict(x.numpy())
    assert out.shape == (2, MAX_DETECTIONS, 6) and out.dtype == np.float32
    assert signature(saved).outputs.inputs[0].shape == (-1, MAX_DETECTIONS, 6)
    for rows, p in zip(out, expected, strict=True):
        n = len(p["scores"])
        assert n > 0
        np.testing.assert_allclose(rows[:n, :4], p["boxes"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(rows[:n, 4], p["scores"].numpy(), rtol=1e-6)
        np.testing.assert_array_equal(rows[:n, 5], p["labels"].numpy())
        assert (rows[n:, :5] == 0).all() and (rows[n:, 5] == -1).all()
