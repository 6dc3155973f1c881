"""tiny-det: determinism, object sizes, the context rule checked from the pixels, COCO output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO

from gattn.data import CUE_PALETTE, TinyDetConfig, generate, synthetic_sample, verify_manifest
from gattn.data.tiny_det import shape_mask, tiny_det_sample

SMALL = {"image_size": 64}  # 1-3 objects, 1-2 distractors: fast


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = generate("tiny-det", tmp_path / "a", 4, seed=5, **SMALL)
    b = generate("tiny-det", tmp_path / "b", 4, seed=5, **SMALL)
    c = generate("tiny-det", tmp_path / "c", 4, seed=6, **SMALL)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert a["files"] == b["files"] != c["files"]
    assert a["kind"] == "det" and a["class_names"] == ["cue_red", "cue_green", "cue_blue"]
    verify_manifest(tmp_path / "a")
    # A sample regenerated alone equals the one written with the others.
    image, target, _ = synthetic_sample("tiny-det", 2, seed=5, **SMALL)
    coco = json.loads((tmp_path / "a" / "annotations.json").read_text())
    boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == 3]
    xywh = target["boxes"].copy()
    xywh[:, 2:] -= xywh[:, :2]
    np.testing.assert_array_equal(np.asarray(boxes), xywh)


def _object_pixels(image: np.ndarray, box: np.ndarray, level: int) -> np.ndarray:
    x0, y0, x1, y1 = box.astype(int)
    return image[y0:y1, x0:x1, 0] == level


def test_objects_small_alike_and_clear_of_the_cue() -> None:
    cfg = TinyDetConfig()
    sides = []
    for i in range(8):
        image, target, meta = tiny_det_sample(cfg, np.random.default_rng([1, 0, i]), i % 3)
        boxes = target["boxes"]
        assert len(boxes) >= 1 and (target["labels"] == i % 3).all()
        w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        sides += [*w, *h]
        assert np.all(np.maximum(w, h) / np.minimum(w, h) <= 4 / 3 + 1e-6)
        # Every object is the same hollow outline: its pixels at the item level are exactly a
        # ring of its size (so no class can be read from an object's own pixels).
        for box, bw, bh in zip(boxes, w, h, strict=True):
            ring = shape_mask("ring", int(bw), int(bh), cfg.ring_width)
            np.testing.assert_array_equal(_object_pixels(image, box, cfg.item_level), ring)
        # A distractor is never a ring.
        for _, x0, y0, x1, y1 in meta["distractors"]:
            patch = _object_pixels(image, np.array([x0, y0, x1, y1]), cfg.item_level)
            assert not np.array_equal(patch, shape_mask("ring", x1 - x0, y1 - y0))
        # The cue holds the class colour and lies cue_clearance * S from every object.
        cx, cy, side = meta["cue_box"]
        assert (image[cy : cy + side, cx : cx + side] == CUE_PALETTE[i % 3]).all()
        dx = np.maximum(np.maximum(cx - boxes[:, 2], boxes[:, 0] - (cx + side)), 0)
        dy = np.maximum(np.maximum(cy - boxes[:, 3], boxes[:, 1] - (cy + side)), 0)
        assert np.hypot(dx, dy).min() >= cfg.cue_clearance * cfg.image_size
    assert cfg.min_object_px <= min(sides) and max(sides) <= cfg.max_object_px
    assert max(sides) - min(sides) >= 6  # sizes do vary over the range


def test_class_lives_in_the_cue_only() -> None:
    """Same layout, other class: only the cue's pixels change, boxes stay; the cue is the only
    coloured pixel block."""
    cfg = TinyDetConfig(image_size=64)
    images, targets = [], []
    for c in range(cfg.num_cues):
        image, target, meta = tiny_det_sample(cfg, np.random.default_rng([0, 0, 9]), c)
        images.append(image)
        targets.append(target)
    cx, cy, side = meta["cue_box"]
    cue = np.zeros(images[0].shape[:2], bool)
    cue[cy : cy + side, cx : cx + side] = True
    for image, target in zip(images[1:], targets[1:], strict=True):
        np.testing.assert_array_equal(image[~cue], images[0][~cue])
        np.testing.assert_array_equal(target["boxes"], targets[0]["boxes"])
    colour = images[0].max(-1) != images[0].min(-1)
    np.testing.assert_array_equal(colour, cue)


def test_counts_scale_with_area() -> None:
    small = TinyDetConfig(image_size=64).counts(8, 16)
    large = TinyDetConfig(image_size=256).counts(8, 16)
    assert small == (2, 4) and large == (32, 64)


def test_coco_file_loads_with_pycocotools(tmp_path: Path) -> None:
    manifest = generate("tiny-det", tmp_path, 3, seed=0, **SMALL)
    coco = COCO(str(tmp_path / "annotations.json"))
    assert sorted(coco.getImgIds()) == [1, 2, 3]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == manifest["class_names"]
    for rec, img in zip(manifest["samples"], coco.loadImgs([1, 2, 3]), strict=True):
        assert rec["image"] == f"images/{img['file_name']}" and img["width"] == 64
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert {a["category_id"] for a in anns} == {rec["meta"]["cue_class"] + 1}
        assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in anns)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"min_object_px": 3}, "min_object_px"),
        ({"max_object_px": 40}, "max_object_px"),
        ({"num_cues": 9}, "num_cues"),
        ({"distractor_kinds": ("star",)}, "distractor_kinds"),
        ({"cue_clearance": 0.9, "max_objects": 60}, "no room"),
    ],
)
def test_bad_options_are_named(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic_sample("tiny-det", 0, **SMALL, **kw)
