"""The generated benchmark: determinism, labels checked from the pixels alone, balance, manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gattn.data.cue_seg import CUE_PALETTE, CueSegConfig
from gattn.data.pathfinder import PathfinderConfig, render_paths
from gattn.data.synthetic import (
    ManifestError,
    generate,
    make_config,
    synthetic_sample,
    verify_manifest,
)

TASKS = ["cue-seg", "pathfinder"]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --- independent pixel tools (plain shifts, no generator code) -------------------------------


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _grow(mask: np.ndarray) -> np.ndarray:
    """3 x 3 dilation."""
    return np.logical_or.reduce([_shift(mask, dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])


def _flood(allowed: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """Pixels of ``allowed`` 8-connected to ``seed``."""
    reach = seed & allowed
    while True:
        nxt = _grow(reach) & allowed
        if (nxt == reach).all():
            return reach
        reach = nxt


def _components(mask: np.ndarray) -> list[np.ndarray]:
    left, parts = mask.copy(), []
    while left.any():
        seed = np.zeros_like(left)
        seed[tuple(np.argwhere(left)[0])] = True
        part = _flood(left, seed)
        parts.append(part)
        left &= ~part
    return parts


def _markers(image: np.ndarray, radius: int) -> list[np.ndarray]:
    """Marker blobs: pixels whose whole disc of ``radius`` is set (thin paths never are)."""
    on = image > 0
    core = np.ones_like(on)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                core &= _shift(on, dy, dx)
    return _components(core)


def _joined(image: np.ndarray, a: np.ndarray, b: np.ndarray) -> bool:
    """Are blobs a and b in one component of the drawing once dash gaps are bridged (1 px)?"""
    return bool((_flood(_grow(image > 0), a) & b).any())


# --- determinism and the manifest ------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_bytes_other_seed_other_bytes(task: str, tmp_path: Path) -> None:
    m1 = generate(task, tmp_path / "a", n=6, image_size=32, seed=3)
    generate(task, tmp_path / "b", n=6, image_size=32, seed=3)
    generate(task, tmp_path / "c", n=6, image_size=32, seed=4)
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert len(images) == 6 and all(a[k] != c[k] for k in images)
    # the manifest's checksums are the files' real sha256
    assert m1["files"] == {k: v for k, v in a.items() if k != "manifest.json"}


@pytest.mark.parametrize("task", TASKS)
def test_a_sample_regenerates_alone(task: str, tmp_path: Path) -> None:
    manifest = generate(task, tmp_path, n=5, image_size=32, seed=7)
    image, target, _ = synthetic_sample(task, 3, seed=7, image_size=32)
    record = manifest["samples"][3]
    assert np.array_equal(np.asarray(Image.open(tmp_path / record["image"])), image)
    if task == "cue-seg":
        assert np.array_equal(np.asarray(Image.open(tmp_path / record["mask"])), target)
    else:
        assert record["label"] == target


def test_verify_manifest_names_changed_and_missing_files(tmp_path: Path) -> None:
    generate("cue-seg", tmp_path, n=3, image_size=32, seed=0)
    assert verify_manifest(tmp_path)["n"] == 3
    (tmp_path / "masks/000001.png").write_bytes(b"x")
    (tmp_path / "images/000002.png").unlink()
    with pytest.raises(ManifestError, match=r"missing.*000002.*changed.*masks/000001"):
        verify_manifest(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="not found"):
        verify_manifest(tmp_path)


def test_pathfinder_writes_labels_csv(tmp_path: Path) -> None:
    manifest = generate("pathfinder", tmp_path, n=4, image_size=32)
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    assert rows[0] == "image,label"
    assert rows[1:] == [f"{s['image']},{s['label']}" for s in manifest["samples"]]
    assert json.loads((tmp_path / "manifest.json").read_text())["class_names"][1] == "connected"


@pytest.mark.parametrize(
    ("task", "kw", "match"),
    [
        ("cue-seg", {"num_cues": 9}, "num_cues=9"),
        ("cue-seg", {"shape_kinds": ("star",)}, "shape_kinds"),
        ("cue-seg", {"image_size": 8}, "image_size=8"),
        ("pathfinder", {"path_length": -1.0}, "path_length=-1.0"),
        ("pathfinder", {"no_such": 1}, r"unknown option.*no_such"),
        ("maze", {}, "unknown synthetic task 'maze'"),
    ],
)
def test_bad_config_is_a_value_error_naming_it(task: str, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_config(task, **kw)


def test_generate_rejects_bad_n(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n=0"):
        generate("pathfinder", tmp_path, n=0)


# --- cue-seg labels ----------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 200])
def test_cue_colour_names_every_shape_pixel(image_size: int) -> None:
    cfg = CueSegConfig(image_size=image_size)
    seen = set()
    for index in range(12):
        image, mask, meta = synthetic_sample("cue-seg", index, seed=1, image_size=image_size)
        rgb = image.astype(int)
        chroma = rgb.max(2) - rgb.min(2)
        cue = chroma > 60
        side = round(cfg.cue_size * image_size)
        assert cue.sum() == side * side  # one solid square
        ys, xs = np.nonzero(cue)
        assert (
            meta["cue_box"] == [xs.min(), ys.min(), side] and np.ptp(xs) == np.ptp(ys) == side - 1
        )
        colour = rgb[cue].mean(0)
        cls = 1 + int(np.argmin([np.abs(colour - np.array(c)).sum() for c in CUE_PALETTE]))
        shapes = (chroma == 0) & (rgb[..., 0] == cfg.shape_level)
        assert shapes.any()
        assert np.array_equal(mask, shapes.astype(np.uint8) * cls)
        # every shape pixel is at least cue_clearance away from the cue
        ys, xs = np.nonzero(shapes)
        cy, cx = np.nonzero(cue)
        gap = np.hypot(ys[:, None] - cy[None], xs[:, None] - cx[None]).min()
        assert gap >= cfg.cue_clearance * image_size
        seen.add(cls)
    assert seen == {1, 2, 3}


# --- pathfinder labels -------------------------------------------------------------------------


def test_hand_drawn_paths_connectivity() -> None:
    cfg = PathfinderConfig(image_size=64)
    xs = np.arange(8, 56, 0.25)
    top = np.stack([np.full_like(xs, 12.0), xs], 1)
    bottom = np.stack([np.full_like(xs, 30.0), xs], 1)
    joined = render_paths(cfg, [top, bottom], np.array([top[0], top[-1]]))
    apart = render_paths(cfg, [top, bottom], np.array([top[0], bottom[-1]]))
    # the paths are dashed: without bridging the gaps the two markers are not pixel-connected
    m = _markers(joined, cfg.px(cfg.marker_radius))
    assert len(m) == 2 and not (_flood(joined > 0, m[0]) & m[1]).any()
    assert _joined(joined, m[0], m[1])
    m = _markers(apart, cfg.px(cfg.marker_radius))
    assert len(m) == 2 and not _joined(apart, m[0], m[1])


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_distractors": 3, "distractor_length": 0.3, "max_turn": 0.5},
        {"path_length": 1.0, "num_distractors": 1},
    ],
)
def test_pathfinder_label_matches_pixel_connectivity(kw: dict) -> None:
    cfg = make_config("pathfinder", **kw)
    labels = []
    for index in range(16):
        image, label, meta = synthetic_sample("pathfinder", index, seed=5, **kw)
        blobs = _markers(image, cfg.px(cfg.marker_radius))
        assert len(blobs) == 2
        centres = np.stack([np.argwhere(b)[:, ::-1].mean(0) for b in blobs])  # (x, y) like meta
        error = min(np.abs(centres[order] - meta["markers"]).max() for order in ([0, 1], [1, 0]))
        assert error <= 1
        assert _joined(image, blobs[0], blobs[1]) == bool(label)
        labels.append(label)
    assert sum(labels) == 8


@pytest.mark.parametrize("n", [30, 31])
def test_pathfinder_is_balanced(n: int, tmp_path: Path) -> None:
    labels = [s["label"] for s in generate("pathfinder", tmp_path, n=n, image_size=32)["samples"]]
    assert abs(2 * sum(labels) - n) <= n % 2
    assert len(set(labels[0::2])) == 2  # which sample of a pair is positive is random
