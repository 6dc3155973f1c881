"""COCO detection folders: labels from category ids, errors that name the bad entry, skipped
images, transforms that move boxes with the image, batching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms import v2

from gattn.data import (
    AnnotationError,
    CocoDetectionDataset,
    DataLayoutError,
    coco_dict,
    collate_detection,
    det_train_transform,
    read_coco,
    seg_eval_transform,
)


def _image(path: Path, w: int = 20, h: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)).save(path)


def _coco(**over: Any) -> dict[str, Any]:
    data = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": 20, "height": 10},
            {"id": 9, "file_name": "sub/b.png", "width": 20, "height": 10},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [2, 1, 4, 3]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [10, 0, 10, 10]},
            {"id": 3, "image_id": 9, "category_id": 5, "bbox": [0, 0, 20.4, 5]},  # rounding
            {"id": 4, "image_id": 9, "category_id": 2, "bbox": [1, 1, 2, 2], "iscrowd": 1},
        ],
        "categories": [{"id": 5, "name": "car"}, {"id": 2, "name": "bike"}],
    }
    return {**data, **over}


def _folder(root: Path, coco: dict[str, Any] | None = None) -> Path:
    _image(root / "images" / "a.png")
    _image(root / "sub" / "b.png")  # found under root/ when not under images/
    (root / "annotations.json").write_text(json.dumps(coco or _coco()))
    return root


def test_round_trip(tmp_path: Path) -> None:
    ds = CocoDetectionDataset(_folder(tmp_path))
    assert ds.classes == ["bike", "car"] and ds.category_ids == [2, 5]  # ids sorted
    assert ds.num_crowd == 1 and len(ds) == 2
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 10, 20)
    assert target["image_id"] == 7
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 1, 6, 4], [10, 0, 20, 10]]))
    assert target["labels"].tolist() == [1, 0] and target["labels"].dtype == torch.long
    _, target = ds[1]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.0, 0, 20, 5]]))  # clipped
    # The subset written back reads the same (labels back to the category ids).
    coco = read_coco(tmp_path / "annotations.json")
    (tmp_path / "again.json").write_text(
        json.dumps(coco_dict(coco.images, coco.category_ids, coco.class_names))
    )
    again = read_coco(tmp_path / "again.json")
    assert again.class_names == coco.class_names and again.category_ids == coco.category_ids
    for x, y in zip(coco.images, again.images, strict=True):
        np.testing.assert_allclose(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.labels, y.labels)


def _edit(index: int, **change: Any) -> dict[str, Any]:
    coco = _coco()
    coco["annotations"][index] = {**coco["annotations"][index], **change}
    return coco


@pytest.mark.parametrize(
    ("coco", "match"),
    [
        (_edit(0, bbox=[2, 1, 0, 3]), r"annotations\[0\] \(id 1\): bbox .* width or height <= 0"),
        (_edit(0, bbox=[2, 1, 4]), r"annotations\[0\].*not 4 finite numbers"),
        (_edit(1, bbox=[10, 0, 12, 10]), r"annotations\[1\].*outside the 20x10 image"),
        (_edit(0, category_id=3), r"category_id 3 is not among the categories' ids \[2, 5\]"),
        (_edit(0, image_id=8), "image_id 8 is not among the images' ids"),
        (_coco(categories=[]), "categories: empty"),
        (_coco(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), "used twice"),
        ({"images": []}, "categories: missing"),
        (
            _coco(images=[{"id": 7, "file_name": "a.png", "width": 20}]),
            r"images\[0\]: lacks \['height'\]",
        ),
    ],
)
def test_bad_annotations_are_named(tmp_path: Path, coco: dict[str, Any], match: str) -> None:
    with pytest.raises(AnnotationError, match=match) as err:
        CocoDetectionDataset(_folder(tmp_path, coco))
    assert "annotations.json" in str(err.value)


def test_missing_files_are_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataLayoutError, match="does not exist"):
        CocoDetectionDataset(tmp_path / "nowhere")
    _image(tmp_path / "images" / "a.png")
    with pytest.raises(DataLayoutError, match="(?s)has no annotations.json.*Expected layout"):
        CocoDetectionDataset(tmp_path)
    (tmp_path / "annotations.json").write_text(json.dumps(_coco()))
    with pytest.raises(DataLayoutError, match=r"1 of 2 image file\(s\) not found.*sub/b.png"):
        CocoDetectionDataset(tmp_path)
    (tmp_path / "annotations.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="not a readable JSON"):
        CocoDetectionDataset(tmp_path)


def test_corrupt_or_resized_images_are_skipped(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _image(root / "sub" / "b.png", w=21)
    coco = _coco()
    coco["images"].append({"id": 11, "file_name": "c.png", "width": 20, "height": 10})
    (root / "annotations.json").write_text(json.dumps(coco))
    _image(root / "images" / "c.png")
    with pytest.warns(UserWarning, match="skipping"):
        ds = CocoDetectionDataset(root)
    assert len(ds) == 1 and ds[0][1]["image_id"] == 11
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert set(reasons) == {"a.png", "b.png"}
    assert "21x10, its annotations say 20x10" in reasons["b.png"]


def _sample(w: int = 40, h: int = 20) -> tuple[tv_tensors.Image, dict[str, Any]]:
    image = tv_tensors.Image(torch.randint(0, 255, (3, h, w), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[2.0, 3, 10, 9], [30, 0, 40, 20]]), format="XYXY", canvas_size=(h, w)
    )
    return image, {"boxes": boxes, "labels": torch.tensor([0, 1]), "image_id": 3}


def test_hflip_flips_the_boxes() -> None:
    image, target = _sample()
    out_image, out = v2.Compose([v2.RandomHorizontalFlip(p=1.0)])(image, target)
    torch.testing.assert_close(out_image, image.flip(-1))
    expected = torch.tensor([[30.0, 3, 38, 9], [0, 0, 10, 20]])  # x -> 40 - x, ends swapped
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), expected)
    # The same pixels lie under each box before and after the flip.
    for before, after in zip(target["boxes"].int(), out["boxes"].int(), strict=True):
        a = image[:, before[1] : before[3], before[0] : before[2]]
        b = out_image[:, after[1] : after[3], after[0] : after[2]]
        torch.testing.assert_close(a.flip(-1), b)


def test_train_transform_rescales_and_drops_cropped_boxes() -> None:
    image, target = _sample()
    x, out = det_train_transform(10, hflip=False)(image, target)  # 40x20 -> 10x10
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    torch.testing.assert_close(
        out["boxes"].as_subclass(torch.Tensor),
        torch.tensor([[0.5, 1.5, 2.5, 4.5], [7.5, 0, 10, 10]]),
    )
    assert out["image_id"] == 3
    torch.manual_seed(0)
    crop = det_train_transform(8, scale=(0.05, 0.1), hflip=False)
    kept = [len(crop(image, target)[1]["labels"]) for _ in range(20)]
    assert min(kept) < 2  # small crops lose boxes, and their labels with them
    for _ in range(5):
        _, out = crop(image, target)
        assert len(out["boxes"]) == len(out["labels"])


def test_collate_and_loader(tmp_path: Path) -> None:
    ds = CocoDetectionDataset(_folder(tmp_path), transform=seg_eval_transform(16))
    images, targets = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_detection)))
    assert images.shape == (2, 3, 16, 16) and [t["image_id"] for t in targets] == [7, 9]
    torch.testing.assert_close(targets[0]["boxes"][0], torch.tensor([1.6, 1.6, 4.8, 6.4]))
    with pytest.raises(ValueError, match="2 sizes in one batch"):
        collate_detection([(torch.zeros(3, 4, 4), {}), (torch.zeros(3, 4, 5), {})])
