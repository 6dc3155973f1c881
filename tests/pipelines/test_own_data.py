"""Your own data, end to end (issue 14): real photos in the README's folder layouts, with only
``data.task`` and ``data.root`` changed from the project's params.yaml (plus the tiny sizes every
pipeline test runs at, :data:`conftest.TINY_SIZES`, and the search space left as it is, so the
default sweep points run), through every stage to a prediction from the served model.

- ``folder-cls``: scikit-image's ``lfw_subset`` (25x25 faces and non-faces) as files;
- ``folder-seg``: imgviz's VOC photo with its instance masks and scikit-image photos with masks
  derived by thresholds, cut into tiles of different sizes.

Both folders hold images as users have them: different sizes, greyscale, RGBA, palette,
16-bit, CMYK and EXIF-rotated files (a segmentation mask is drawn on the upright photo).
"""

from __future__ import annotations

import base64
import io
import json
import mimetypes
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")
imgviz = pytest.importorskip("imgviz")
pytestmark = pytest.mark.slow  # every stage, then a Serve app: minutes on 2 cores


def _exif_rotated_jpeg(rgb: np.ndarray, path: Path) -> None:
    """``rgb`` stored sideways with the EXIF tag that turns it upright (as a phone does)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers turn it 90 degrees clockwise
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(
        path, exif=exif.tobytes(), quality=95
    )


def _save_as(image: np.ndarray, path: Path, form: str) -> Path:
    """Save an RGB or grey uint8 array the way ``form`` says; returns the path written."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    grey = image if image.ndim == 2 else np.asarray(Image.fromarray(image).convert("L"))
    if form == "grey":
        Image.fromarray(grey).save(path := path.with_suffix(".png"))
    elif form == "rgba":
        alpha = np.full(grey.shape, 255, np.uint8)
        Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path := path.with_suffix(".png"))
    elif form == "palette":
        Image.fromarray(rgb).quantize(64).save(path := path.with_suffix(".png"))
    elif form == "16bit":
        Image.fromarray(grey.astype(np.uint16) * 257).save(path := path.with_suffix(".png"))
    elif form == "cmyk":
        Image.fromarray(rgb).convert("CMYK").save(path := path.with_suffix(".jpg"), quality=95)
    elif form == "exif":
        _exif_rotated_jpeg(rgb, path := path.with_suffix(".jpg"))
    else:
        Image.fromarray(rgb).save(path := path.with_suffix(".jpg"), quality=95)
    return path


FORMS = ("grey", "rgb", "rgba", "palette", "16bit", "cmyk", "exif")


def _resize(image: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    mode = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize(size, mode))


def faces_folder(root: Path, per_class: int = 21) -> Path:
    """``root/face/*`` and ``root/not-face/*`` from ``lfw_subset`` (first 100 faces, next 100
    not), in every form and three sizes."""
    images = (skimage_data.lfw_subset() * 255).round().astype(np.uint8)
    for label, offset in (("face", 0), ("not-face", 100)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            image = images[offset + i]
            side = (25, 40, 57)[i % 3]
            if side != 25:
                image = _resize(image, (side, side))
            _save_as(image, root / label / f"{i:03d}", FORMS[i % len(FORMS)])
    return root


def _otsu_mask(grey: np.ndarray, cls: int, dark: bool = False) -> np.ndarray:
    from skimage.filters import threshold_otsu

    fg = grey < threshold_otsu(grey) if dark else grey > threshold_otsu(grey)
    return np.where(fg, cls, 0).astype(np.uint8)


def scenes_folder(root: Path) -> Path:
    """``root/images/*`` + ``root/masks/*``: VOC (0 background, 1 person, 2 other object, 255
    ignore on the objects' borders) and scikit-image photos with threshold masks, cut into
    tiles of different sizes and saved in every form."""
    voc = imgviz.data.voc()
    label = voc["class_label"]
    voc_mask = np.where(label == 15, 1, np.where(label > 0, 2, 0)).astype(np.uint8)
    edge = np.zeros_like(voc_mask, bool)
    edge[1:, :] |= voc_mask[1:, :] != voc_mask[:-1, :]
    voc_mask[edge] = 255
    camera = skimage_data.camera()  # a man (dark) before the sky
    coins = skimage_data.coins()
    coffee = skimage_data.coffee()
    photos = [
        (voc["rgb"], voc_mask),
        (camera, _otsu_mask(camera, 1, dark=True)),
        (coins, _otsu_mask(coins, 2)),
        (coffee, _otsu_mask(np.asarray(Image.fromarray(coffee).convert("L")), 2, dark=True)),
    ]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    n = 0
    for photo, mask in photos:
        h, w = mask.shape
        tiles = [
            (0, 0, h, w),
            (0, 0, h // 2, w // 2),
            (h // 3, w // 4, h, w),
            (h // 2, 0, h, w // 2),
        ]
        for y0, x0, y1, x1 in tiles:
            scale = 96 / max(y1 - y0, x1 - x0)  # small: the test runs on 2 cores
            size = (max(16, round((x1 - x0) * scale)), max(16, round((y1 - y0) * scale)))
            image = _resize(np.ascontiguousarray(photo[y0:y1, x0:x1]), size)
            tile_mask = _resize(np.ascontiguousarray(mask[y0:y1, x0:x1]), size, nearest=True)
            _save_as(image, root / "images" / f"{n:03d}", FORMS[n % len(FORMS)])
            Image.fromarray(tile_mask).save(root / "masks" / f"{n:03d}.png")
            n += 1
    return root


@contextmanager
def served(repo: Path, env: dict[str, str], timeout_s: float = 300) -> Iterator[str]:
    """``gattn serve`` in ``repo`` (the deploy stage's config) until the block ends; yields the
    app's URL. Stopped with SIGINT (Ctrl-C), which shuts Serve and its local Ray down."""
    import yaml

    config = yaml.safe_load((repo / "models" / "deploy" / "serve_config.yaml").read_text())
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    log = (repo / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "serve"],
        cwd=repo,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, (repo / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/v1/model", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, (repo / "serve.log").read_text()[-3000:]
            time.sleep(2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def _post(url: str, photo: Path) -> dict:
    """``POST /v1/predict`` of a file, as ``curl --data-binary @photo`` sends it."""
    ctype = mimetypes.guess_type(photo.name)[0] or "application/octet-stream"
    request = urllib.request.Request(
        f"{url}/v1/predict", data=photo.read_bytes(), headers={"Content-Type": ctype}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _predict(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """``gattn predict ARGS`` in ``repo`` (its URL from the repo's params.yaml)."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "predict", *args],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _env(repo: Path) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(repo))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["GATTN_MODEL_CACHE"] = str(repo / "model-cache")
    return env


def _run_pipeline(
    repo_dir: Path,
    root: Path,
    task: str,
    tiny_project: Callable[..., Path],
    gattn_cli: Callable[..., subprocess.CompletedProcess],
    free_port: Callable[[], int],
) -> Path:
    repo = tiny_project(
        repo_dir,
        [f"data.task={task}", f"data.root={root}", f"serve.port={free_port()}"],
        small_space=False,  # the default search space and its preset points, as a user has them
    )
    out = gattn_cli(repo, "pipeline", timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return repo


def test_folder_cls_photos_through_every_stage_to_a_served_prediction(
    tmp_path: Path,
    tiny_project: Callable[..., Path],
    gattn_cli: Callable[..., subprocess.CompletedProcess],
    free_port: Callable[[], int],
) -> None:
    root = faces_folder(tmp_path / "faces")
    repo = _run_pipeline(tmp_path / "repo", root, "folder-cls", tiny_project, gattn_cli, free_port)

    report = json.loads((repo / "reports" / "prepare" / "report.json").read_text())
    assert report["classes"] == ["face", "not-face"] and not report["skipped"]
    assert report["metrics"]["num_samples"] == 42
    assert {"25x25", "40x40", "57x57"} <= set(report["image_sizes"])
    trials = (repo / "reports" / "tune" / "trials.csv").read_text()
    assert "ok" in trials  # the default sweep points ran (without their segmentation head)
    model = json.loads((repo / "models" / "finetuned" / "config.json").read_text())
    assert model["task"] == "cls" and model["classes"] == ["face", "not-face"]

    env = _env(repo)
    photos = sorted((root / "face").iterdir())[: len(FORMS)]  # one file of each form
    with served(repo, env) as url:
        out = _predict(repo, env, str(photos[0]))  # the README's client, as a user calls it
        assert out.returncode == 0 and "face" in out.stdout, out.stderr
        for photo in photos:
            answer = _post(url, photo)
            assert answer["task"] == "cls", photo.name
            assert {t["label"] for t in answer["top_k"]} == {"face", "not-face"}
            with Image.open(photo) as im:
                assert (answer["width"], answer["height"]) == im.size  # square: EXIF or not


def test_folder_seg_photos_through_every_stage_to_a_served_prediction(
    tmp_path: Path,
    tiny_project: Callable[..., Path],
    gattn_cli: Callable[..., subprocess.CompletedProcess],
    free_port: Callable[[], int],
) -> None:
    root = scenes_folder(tmp_path / "scenes")
    repo = _run_pipeline(tmp_path / "repo", root, "folder-seg", tiny_project, gattn_cli, free_port)

    report = json.loads((repo / "reports" / "prepare" / "report.json").read_text())
    assert report["classes"] == ["0", "1", "2"]  # num_classes read from the masks
    assert not report["skipped"] and len(report["image_sizes"]) > 3
    model = json.loads((repo / "models" / "finetuned" / "config.json").read_text())
    assert model["task"] == "seg" and len(model["classes"]) == 3

    env = _env(repo)
    photos = sorted((root / "images").iterdir())[: len(FORMS)]  # one file of each form
    with served(repo, env) as url:
        mask_out = tmp_path / "served.png"
        out = _predict(repo, env, str(photos[0]), "--mask", str(mask_out))
        assert out.returncode == 0 and mask_out.is_file(), out.stderr
        for photo in photos:
            answer = _post(url, photo)
            mask = Image.open(io.BytesIO(base64.b64decode(answer["mask_png"])))
            with Image.open(root / "masks" / f"{photo.stem}.png") as truth:
                assert mask.size == truth.size, photo.name  # the upright photo's, EXIF or not
            assert np.asarray(mask).max() < 3
