"""A detector behind the serving code without Ray: the predictor's boxes, the upload checks,
``gattn explain`` and the deploy stage's smoke test (the HTTP app: test_serve.py)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gattn.inference import sliding_window_detect
from gattn.models import build_model, save_model
from pipelines.commands.explain import explain
from pipelines.config import ServeParams
from pipelines.serve.http_io import InputError, decode_image
from pipelines.serve.predictor import Job, Options, Predictor
from pipelines.stages.deploy import smoke_test

DET = {"task": "det", "recipe": "gattn_det_p2_ppm_lk", "num_classes": 3}
SIZE = 64  # inputs >= 64 px: GroupNorm fails on the 1x1 top level of a batch of one
CLASSES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def det_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("det")
    meta = {"task": "det", "classes": CLASSES, "img_size": SIZE}
    return save_model(build_model(DET), DET, root / "det", **meta)


def picture(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_predictor_returns_boxes_in_image_pixels(det_dir: Path) -> None:
    predictor = Predictor(det_dir)
    assert predictor.spec.task == "det" and predictor.spec.feedback
    small = predictor.spec.preprocess(picture(SIZE, SIZE, 0))
    large = predictor.spec.preprocess(picture(100, 90, 1))
    assert large.shape == (3, 100, 90)  # a detector sees the image at its own size
    plain, windows, augmented = predictor.run(
        [Job(small, Options()), Job(large, Options()), Job(large, Options(tta=True))]
    )
    for found in (plain, windows, augmented):
        assert isinstance(found, dict) and len(found["boxes"]) > 0
        assert len(found["boxes"]) == len(found["scores"]) == len(found["labels"])
        assert (np.diff(found["scores"]) <= 0).all() and set(found["labels"]) <= {0, 1, 2}
    assert (windows["boxes"][:, 2] <= 90).all() and (windows["boxes"][:, 3] <= 100).all()
    (expected,) = sliding_window_detect(
        predictor.detector, large[None], SIZE, SIZE // 4, global_context="auto"
    )
    np.testing.assert_allclose(windows["scores"], expected["scores"].numpy(), atol=1e-6)
    (whole,) = predictor.run([Job(large, Options(sliding="off"))])
    assert isinstance(whole, dict) and len(whole["boxes"]) > 0


def test_uploads_that_are_no_image_are_refused() -> None:
    with pytest.raises(InputError) as err:
        decode_image(b"\x00\xffnot an image" * 10, max_pixels=SIZE * SIZE)
    assert err.value.status == 400 and err.value.code == "not_an_image"
    buf = io.BytesIO()
    picture(SIZE, SIZE, 2).save(buf, format="PNG")
    with pytest.raises(InputError) as err:
        decode_image(buf.getvalue(), max_pixels=SIZE * SIZE - 1)
    assert err.value.status == 413


def test_explain_a_detection_and_deploy_smoke_test(det_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "scene.png"
    picture(80, 72, 3).save(path)
    out = explain(path, det_dir, out=tmp_path / "cam.png")
    top = Predictor(det_dir)
    x = top.spec.preprocess(picture(80, 72, 3))[None]
    (found,) = top.detector.predict(x, score_thresh=0.0, max_det=1)
    assert out["method"] == "grad_cam" and out["target"] == int(found["labels"][0])
    assert (tmp_path / "cam.png").stat().st_size > 1000
    out = explain(path, det_dir, method="gradcam", target=2, out=tmp_path / "cam2.png")
    assert out["class"] == "blue"
    method, heat, target = top.explain(x[0], "grad_cam", 1)
    assert (method, target, heat.shape) == ("grad_cam", 1, (80, 72))
    assert heat.min() >= 0 and heat.max() <= 1
    with pytest.raises(ValueError, match="rollout"):
        top.explain(x[0], "rollout")
    assert smoke_test(str(det_dir), None, ServeParams())["task"] == "det"
