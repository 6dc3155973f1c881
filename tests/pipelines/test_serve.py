"""The Ray Serve app against a real local Serve instance (one per module).

Two apps from one serve config written by :func:`pipelines.stages.deploy.serve_config` and deployed
the way ``gattn serve`` does: ``/cls`` serves a tiny ViT classifier from the MLflow registry
(``models:/...@champion``) with bearer-token auth; ``/seg`` a tiny CNN segmenter from a
folder, without auth; ``/det`` the small-object detector recipe from a folder. Served outputs
are checked against the models run offline.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from gattn.inference import sliding_window, tta
from gattn.models import build_model, load_model, save_model
from pipelines.cli import main
from pipelines.config import ServeParams
from pipelines.registry import register
from pipelines.stages.deploy import serve_config

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow  # one Serve instance with two apps: ~1 min to start on 2 cores

TOKEN_ENV, TOKEN = "GATTN_TEST_SERVE_TOKEN", "test-token-8c1f"
SIZE = 32
VIT = {"embed_dim": 32, "depth": 1, "num_heads": 2}
CLS = {"task": "cls", "backbone": "gattn_vit_global", "num_classes": 3, "img_size": SIZE,
       "backbone_kwargs": VIT}  # fmt: skip
SEG = {"task": "seg", "backbone": "gattn_local_cnn", "num_classes": 3, "head": "fcn"}
DET = {"task": "det", "recipe": "gattn_det_p2_ppm_lk", "num_classes": 3}
DET_SIZE = 64  # GroupNorm needs more than one value per group on the top level
CLASSES = ["bg", "ring", "dot"]
LIMITS = {"max_body_bytes": 200_000, "max_pixels": 256 * 256, "batch_wait_timeout_s": 0.25}


@dataclass(frozen=True)
class Server:
    url: str
    cls_dir: Path
    seg_dir: Path
    det_dir: Path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, free_port: Callable[[], int]
) -> Iterator[Server]:
    from ray.serve.schema import ServeDeploySchema

    from pipelines.ray_session import local_ray
    from pipelines.serve.runner import cpus_needed, deploy_config

    root = tmp_path_factory.mktemp("serve")
    store = f"sqlite:///{root / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_MODE", "disabled")
    mp.setenv(TOKEN_ENV, TOKEN)  # replicas inherit the environment Ray starts with
    mp.setenv("GATTN_MODEL_CACHE", str(root / "cache"))
    torch.manual_seed(0)
    cls_dir = save_model(build_model(CLS), CLS, root / "cls", classes=CLASSES, img_size=SIZE)
    segmenter = build_model(SEG)
    # Untrained logits are nearly tied (std ~3e-4) and the context projection starts at zero:
    # spread the classes and make global feedback count, as training would.
    torch.nn.init.normal_(segmenter.head.conv_seg.weight, std=30.0)
    torch.nn.init.normal_(segmenter.head.context_proj.weight, std=1.0)
    seg_dir = save_model(segmenter, SEG, root / "seg", classes=CLASSES, img_size=SIZE)
    det_dir = save_model(build_model(DET), DET, root / "det", classes=CLASSES, img_size=DET_SIZE)
    mlflow.set_tracking_uri(store)
    try:
        version = register(cls_dir, "gattn-test-cls")
    finally:
        mlflow.set_tracking_uri(None)  # back to $MLFLOW_TRACKING_URI; leave no global behind

    port = free_port()
    common = {"port": port, "num_cpus": 1, "max_batch_size": 8, **LIMITS}
    cls_p = ServeParams(app_name="cls", route_prefix="/cls", auth_token_env=TOKEN_ENV, **common)
    seg_p = ServeParams(app_name="seg", route_prefix="/seg", **common)
    config = serve_config(cls_p, "models:/gattn-test-cls@champion", store)
    config["applications"] += serve_config(seg_p, str(seg_dir))["applications"]
    det_p = ServeParams(app_name="det", route_prefix="/det", **common)
    config["applications"] += serve_config(det_p, str(det_dir))["applications"]
    schema = ServeDeploySchema.model_validate(config)
    try:
        with local_ray(num_cpus=cpus_needed(schema)):
            try:
                deploy_config(schema, timeout_s=240)  # starts Serve on 127.0.0.1:port
                assert version == 1
                yield Server(f"http://127.0.0.1:{port}", cls_dir, seg_dir, det_dir)
            finally:
                serve.shutdown()
    finally:
        mp.undo()


# --------------------------------------------------------------------------------------------
# Helpers: requests, images, the offline reference.


def request(
    url: str,
    data: bytes | None = None,
    content_type: str | None = "image/png",
    token: str | None = None,
    method: str | None = None,
) -> tuple[int, dict[str, Any], Any]:
    """``(status, headers, JSON or text body)`` of one request; HTTP errors are returned."""
    headers = {"Content-Type": content_type} if content_type and data is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, hdrs, body = r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        status, hdrs, body = err.code, dict(err.headers), err.read()
    try:
        return status, hdrs, json.loads(body)
    except json.JSONDecodeError:
        return status, hdrs, body.decode(errors="replace")


def random_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def as_tensor(image: Image.Image) -> torch.Tensor:
    """``(1, 3, H, W)`` floats in [0, 1], written out independently of the app's transform."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width x height`` RGB, with a few bytes of pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def decode_png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def assert_mask_matches(mask: np.ndarray, scores: torch.Tensor, margin: float = 1e-4) -> None:
    """``mask`` is the argmax of ``scores`` ``(1, K, H, W)`` wherever the top two classes are
    more than ``margin`` apart (float rounding may flip a near tie between two processes)."""
    top2 = scores[0].topk(2, dim=0).values
    sure = (top2[0] - top2[1] > margin).numpy()
    assert sure.mean() > 0.95
    np.testing.assert_array_equal(mask[sure], scores[0].argmax(0).numpy()[sure])


def offline(model_dir: Path) -> torch.nn.Module:
    return load_model(model_dir)[0]


# --------------------------------------------------------------------------------------------
# Predictions equal the offline model's.


def test_classifier_from_registry_matches_offline(server: Server) -> None:
    image = random_image(SIZE, SIZE, 1)
    status, _, out = request(f"{server.url}/cls/v1/predict?top_k=3", encode(image), token=TOKEN)
    assert status == 200, out
    with torch.no_grad():
        probs = offline(server.cls_dir)(as_tensor(image)).softmax(1)[0]
    order = probs.argsort(descending=True).tolist()
    assert [t["index"] for t in out["top_k"]] == order
    assert [t["label"] for t in out["top_k"]] == [CLASSES[i] for i in order]
    served = [t["probability"] for t in out["top_k"]]
    np.testing.assert_allclose(served, probs[order].numpy(), rtol=0, atol=1e-5)
    assert out["model"] == {
        "name": "gattn-test-cls",
        "version": 1,
        "alias": "champion",
        "source": "models:/gattn-test-cls@champion",
    }


def test_segmenter_matches_offline_and_reports_areas(server: Server) -> None:
    image = random_image(SIZE, SIZE, 2)
    status, _, out = request(f"{server.url}/seg/v1/predict", encode(image))
    assert status == 200, out
    with torch.no_grad():
        logits = offline(server.seg_dir)(as_tensor(image))
    mask = decode_png(out["mask_png"])
    assert_mask_matches(mask, logits)
    assert not out["sliding_window"] and out["task"] == "seg"
    areas = {a["label"]: a["pixels"] for a in out["areas"]}
    assert areas == {c: int((mask == i).sum()) for i, c in enumerate(CLASSES)}
    assert sum(a["fraction"] for a in out["areas"]) == pytest.approx(1.0)


def test_large_image_uses_sliding_window_with_global_feedback(server: Server) -> None:
    image = random_image(80, 70, 3)  # larger than the 32-pixel input: windows + feedback
    status, _, out = request(f"{server.url}/seg/v1/predict", encode(image, "BMP"), "image/bmp")
    assert status == 200, out
    assert out["sliding_window"] and (out["width"], out["height"]) == (70, 80)
    model, x = offline(server.seg_dir), as_tensor(image)
    with_feedback = sliding_window(model, x, SIZE, SIZE // 4, 16, global_context="auto")
    without = sliding_window(model, x, SIZE, SIZE // 4, 16)
    served = decode_png(out["mask_png"])
    assert_mask_matches(served, with_feedback)
    assert (served != without.argmax(1)[0].numpy()).any()  # the feedback changed the answer
    status, _, off = request(f"{server.url}/seg/v1/predict?sliding=off", encode(image))
    assert status == 200 and not off["sliding_window"]
    with torch.no_grad():  # a convolutional model takes the whole image
        assert_mask_matches(decode_png(off["mask_png"]), model(x))


def test_tta_matches_offline(server: Server) -> None:
    image = random_image(SIZE, SIZE, 4)
    status, _, out = request(f"{server.url}/seg/v1/predict?tta=true", encode(image))
    assert status == 200 and out["tta"], out
    probs = tta(offline(server.seg_dir), as_tensor(image), (0.75, 1.0, 1.25), True, "seg")
    assert_mask_matches(decode_png(out["mask_png"]), probs, margin=1e-5)


def test_concurrent_requests_are_batched_and_answered_in_order(server: Server) -> None:
    images = [random_image(SIZE, SIZE, 100 + i) for i in range(12)]
    model = offline(server.seg_dir)
    with ThreadPoolExecutor(len(images)) as pool:
        answers = list(
            pool.map(lambda im: request(f"{server.url}/seg/v1/predict", encode(im)), images)
        )
    assert [status for status, _, _ in answers] == [200] * len(images)
    sizes = [out["batch_size"] for _, _, out in answers]
    assert max(sizes) > 1, f"no request was batched with another: {sizes}"
    assert max(sizes) <= 8  # max_batch_size
    with torch.no_grad():
        for image, (_, _, out) in zip(images, answers, strict=True):
            assert_mask_matches(decode_png(out["mask_png"]), model(as_tensor(image)))


# --------------------------------------------------------------------------------------------
# Bad input: a 4xx JSON error naming the problem, and the server keeps serving.


def _jpeg_truncated() -> bytes:
    data = encode(random_image(64, 64, 5), "JPEG")
    return data[: len(data) // 2]


def _multipart(field: str, payload: bytes) -> tuple[bytes, str]:
    boundary = "gattnboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _ppm() -> bytes:
    return encode(random_image(8, 8, 6), "PPM")


BAD_INPUTS = {
    "garbage bytes": (lambda: (b"\x00\xffnot an image at all" * 10, "image/png"), 400, "not_an"),
    "truncated jpeg": (lambda: (_jpeg_truncated(), "image/jpeg"), 400, "corrupt_image"),
    "empty body": (lambda: (b"", "image/png"), 400, "empty_body"),
    "0x0 png": (lambda: (png_with_header(0, 0), "image/png"), 400, ""),
    "huge declared png": (lambda: (png_with_header(100_000, 100_000), "image/png"), 413, "too_"),
    "over pixel limit": (lambda: (encode(Image.new("RGB", (300, 300))), "image/png"), 413, "too_"),
    "over body limit": (lambda: (b"\x89PNG" + b"\0" * 250_000, "image/png"), 413, "body_too"),
    "wrong content type": (lambda: (encode(random_image(8, 8, 8)), "text/plain"), 415, "unsup"),
    "json content type": (lambda: (b'{"image": 1}', "application/json"), 415, "unsupported"),
    "unsupported format": (lambda: (_ppm(), "image/x-portable-pixmap"), 415, "unsupported_f"),
    "multipart without file": (lambda: _multipart("photo", b"abc"), 400, "missing_file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_4xx_json_and_server_keeps_serving(server: Server, case: str) -> None:
    make, expected, code = BAD_INPUTS[case]
    body, ctype = make()
    status, _, out = request(f"{server.url}/seg/v1/predict", body, ctype, method="POST")
    assert status == expected, out
    assert isinstance(out, dict) and out["error"].startswith(code) and out["detail"], out
    good = encode(random_image(SIZE, SIZE, 9))
    assert request(f"{server.url}/seg/v1/predict", good)[0] == 200


def test_multipart_upload_and_bad_parameter(server: Server) -> None:
    image = random_image(SIZE, SIZE, 10)
    body, ctype = _multipart("file", encode(image))
    status, _, out = request(f"{server.url}/seg/v1/predict", body, ctype)
    assert status == 200, out
    with torch.no_grad():
        assert_mask_matches(decode_png(out["mask_png"]), offline(server.seg_dir)(as_tensor(image)))
    status, _, out = request(f"{server.url}/seg/v1/predict?sliding=sideways", encode(image))
    assert status == 422 and out["error"] == "invalid_parameter" and "sliding" in out["detail"]


# --------------------------------------------------------------------------------------------
# Auth, model info, explanations, docs, the command-line client.


def test_auth_on_and_off(server: Server) -> None:
    info = f"{server.url}/cls/v1/model"
    status, headers, out = request(info)
    assert status == 401 and out["error"] == "unauthorized"
    assert headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
    assert request(info, token="wrong")[0] == 401
    image = encode(random_image(SIZE, SIZE, 11))
    assert request(f"{server.url}/cls/v1/predict", image)[0] == 401
    status, _, out = request(info, token=TOKEN)
    assert status == 200
    assert out["task"] == "cls" and out["classes"] == CLASSES and out["input_size"] == [32, 32]
    assert out["model"]["name"] == "gattn-test-cls" and out["model"]["version"] == 1
    assert request(f"{server.url}/cls/healthz")[0] == 200  # liveness needs no token
    status, _, out = request(f"{server.url}/seg/v1/model")  # auth off
    assert status == 200 and out["task"] == "seg" and out["model"]["version"] is None


def test_explain_rollout_for_vit_and_grad_cam_for_cnn(server: Server) -> None:
    image = random_image(SIZE, SIZE, 12)
    status, _, out = request(f"{server.url}/cls/v1/explain", encode(image), token=TOKEN)
    assert status == 200, out
    assert out["method"] == "rollout" and out["label"] == CLASSES[out["target"]]
    assert decode_png(out["heatmap_png"]).shape == (SIZE, SIZE, 3)
    large = random_image(48, 40, 13)
    status, _, out = request(f"{server.url}/seg/v1/explain?target=2", encode(large))
    assert status == 200 and out["method"] == "grad_cam" and out["target"] == 2, out
    assert decode_png(out["heatmap_png"]).shape == (48, 40, 3)
    status, _, out = request(f"{server.url}/seg/v1/explain?method=rollout", encode(large))
    assert status == 422 and "rollout" in out["detail"]


def test_openapi_docs(server: Server) -> None:
    status, _, page = request(f"{server.url}/cls/docs")
    assert status == 200 and "swagger" in page.lower()
    status, _, spec = request(f"{server.url}/cls/openapi.json")
    assert {"/v1/predict", "/v1/explain", "/v1/model", "/healthz"} <= set(spec["paths"])
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/png", "image/jpeg"} <= set(body)


def test_predict_client(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"serve": {"auth_token_env": TOKEN_ENV}}))
    image = random_image(SIZE, SIZE, 14)
    path = tmp_path / "x.png"
    image.save(path)
    mask, heat = tmp_path / "out" / "mask.png", tmp_path / "heat.png"
    base = ["predict", "--params", str(params), str(path)]
    outputs = ["--mask", str(mask), "--explain", str(heat)]
    assert main([*base, "--url", f"{server.url}/seg", *outputs]) == 0
    with torch.no_grad():
        assert_mask_matches(np.asarray(Image.open(mask)), offline(server.seg_dir)(as_tensor(image)))
    assert Image.open(heat).size == (SIZE, SIZE)
    capsys.readouterr()
    # The token comes from $GATTN_TEST_SERVE_TOKEN (serve.auth_token_env).
    assert main([*base, "--url", f"{server.url}/cls", "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("gattn-test-cls v1 (cls, 32x32)") and len(lines) == 3
    assert main([*base, "--url", f"{server.url}/cls", "--token", "wrong"]) == 1
    assert "HTTP 401" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Detection: boxes in JSON, bad input refused as for the other tasks, boxes drawn by the client.


def test_detector_answers_boxes_like_offline_and_explains_them(server: Server) -> None:
    image = random_image(DET_SIZE, DET_SIZE, 20)
    status, _, out = request(f"{server.url}/det/v1/predict", encode(image))
    assert status == 200, out
    assert out["task"] == "det" and not out["sliding_window"] and out["boxes"]
    (found,) = offline(server.det_dir).predict(as_tensor(image))
    scores = [b["score"] for b in out["boxes"]]
    np.testing.assert_allclose(scores, found["scores"], atol=1e-4)
    # Untrained scores nearly tie, so the order of equal-scoring boxes may differ between two
    # processes: each served box is one the offline model found, with its label.
    offline_boxes = found["boxes"].numpy()
    for b in out["boxes"]:
        same = np.abs(offline_boxes - np.array(b["box"])).max(1) < 1e-2
        assert same.any() and b["label"] in {CLASSES[k] for k in found["labels"][same]}
    cut = float(np.median(scores))
    status, _, out = request(f"{server.url}/det/v1/predict?min_score={cut}", encode(image))
    assert status == 200 and 0 < len(out["boxes"]) <= len(scores)
    assert min(b["score"] for b in out["boxes"]) >= cut

    large = random_image(150, 130, 21)  # larger than the input: windows with feedback
    status, _, out = request(f"{server.url}/det/v1/predict?tta=true", encode(large))
    assert status == 200 and out["sliding_window"] and out["tta"], out
    boxes = np.array([b["box"] for b in out["boxes"]])
    assert (boxes >= 0).all() and (boxes[:, 2] <= 130).all() and (boxes[:, 3] <= 150).all()

    status, _, out = request(f"{server.url}/det/v1/explain?target=1", encode(large))
    assert status == 200 and (out["method"], out["label"]) == ("grad_cam", CLASSES[1]), out
    assert decode_png(out["heatmap_png"]).shape == (150, 130, 3)
    status, _, out = request(f"{server.url}/det/v1/explain?method=rollout", encode(large))
    assert status == 422 and "rollout" in out["detail"]


@pytest.mark.parametrize("case", ["garbage bytes", "truncated jpeg", "over pixel limit"])
def test_detector_refuses_bad_input(server: Server, case: str) -> None:
    make, expected, code = BAD_INPUTS[case]
    body, ctype = make()
    status, _, out = request(f"{server.url}/det/v1/predict", body, ctype, method="POST")
    assert status == expected and out["error"].startswith(code), out


def test_predict_client_draws_the_boxes(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "x.png"
    random_image(DET_SIZE, DET_SIZE + 8, 22).save(path)
    drawn = tmp_path / "boxes.png"
    argv = ["predict", str(path), "--url", f"{server.url}/det", "--boxes", str(drawn)]
    assert main([*argv, "--min-score", "0.0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "(det, 72x64)" in lines[0] and lines[1].strip().endswith("boxes")
    assert Image.open(drawn).size == (DET_SIZE + 8, DET_SIZE)
    assert (np.asarray(Image.open(drawn)) != np.asarray(Image.open(path))).any()
