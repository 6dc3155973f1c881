"""Folder data sets: bad files are skipped and counted, bad layouts are clear errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gattn.data.datasets import (
    DataLayoutError,
    ImageFolderDataset,
    SegmentationFolderDataset,
    SyntheticDataset,
)
from gattn.data.synthetic import generate
from gattn.data.views import seg_train_transform


def _png(path: Path, value: int, size: int = 8, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)
    return path


@pytest.fixture
def folder_with_bad_files(tmp_path: Path) -> Path:
    for c, v in (("cat", 10), ("dog", 200)):
        for i in range(3):
            _png(tmp_path / c / f"{i}.png", v)
    raw = (tmp_path / "cat" / "0.png").read_bytes()
    (tmp_path / "cat" / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "dog" / "garbage.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "dog" / "notes.txt").write_text("not an image, ignored")
    return tmp_path


def test_index_time_check_skips_and_names_bad_files(folder_with_bad_files: Path) -> None:
    with pytest.warns(UserWarning) as record:
        ds = ImageFolderDataset(folder_with_bad_files)
    names = sorted(Path(p).name for p, _ in ds.skipped)
    assert names == ["garbage.png", "truncated.png"]
    assert sum("truncated.png" in str(w.message) for w in record) == 1
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    image, label = ds[4]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8)
    assert label == 1 and torch.allclose(image, torch.full_like(image, 200 / 255))


def test_load_time_failures_never_break_an_epoch(folder_with_bad_files: Path) -> None:
    ds = ImageFolderDataset(folder_with_bad_files, check="none")
    assert len(ds) == 8
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = list(DataLoader(ds, batch_size=3, shuffle=True))
    assert sum(len(labels) for _, labels in batches) == 8  # bad samples replaced, not dropped
    assert sorted(Path(p).name for p, _ in ds.skipped) == ["garbage.png", "truncated.png"]
    assert {Path(p).name for p, _ in ds.skipped} <= {
        n for w in record for n in ("garbage.png", "truncated.png") if n in str(w.message)
    }
    # a replacement is a real, valid sample: its pixels match its label
    for images, labels in batches:
        for image, label in zip(images, labels, strict=True):
            assert image.mean().item() == pytest.approx((10, 200)[label] / 255)


def test_dataloader_with_workers_over_bad_files(folder_with_bad_files: Path) -> None:
    ds = ImageFolderDataset(folder_with_bad_files, check="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(y) for _, y in DataLoader(ds, batch_size=4, num_workers=2))
    assert n == 8


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root: None, "no class sub-folders"),
        (lambda root: _png(root / "loose.png", 1), r"1 image\(s\) directly in it"),
        (lambda root: (root / "a").mkdir(), r"without images: \['a'\]"),
    ],
)
def test_image_folder_layout_errors(tmp_path: Path, make, match: str) -> None:
    make(tmp_path)
    with pytest.raises(DataLayoutError, match=match) as err:
        ImageFolderDataset(tmp_path)
    assert "Expected layout" in str(err.value) and "class_a/" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_root_is_a_layout_error(tmp_path: Path) -> None:
    with pytest.raises(DataLayoutError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def test_all_images_unreadable_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(DataLayoutError, match="no readable image"):
        ImageFolderDataset(tmp_path)


def _seg_pair(root: Path, stem: str, mask: np.ndarray, image_size: int | None = None) -> None:
    size = image_size or mask.shape[0]
    _png(root / "images" / f"{stem}.png", 50, size)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8), mode="L").save(root / "masks" / f"{stem}.png")


def test_segmentation_pairs_by_stem_and_validates_masks(tmp_path: Path) -> None:
    good = np.zeros((8, 8), np.uint8)
    good[2:5, 3:6] = 2
    good[0, 0] = 255  # ignore index is allowed
    _seg_pair(tmp_path, "a", good)
    _seg_pair(tmp_path, "b", np.full((8, 8), 7))  # 7 >= num_classes
    _seg_pair(tmp_path, "c", np.zeros((6, 6)), image_size=8)  # size mismatch
    _seg_pair(tmp_path, "d", np.zeros((8, 8)))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "masks" / "d.png")  # RGB
    with pytest.warns(UserWarning) as record:
        ds = SegmentationFolderDataset(tmp_path, num_classes=3)
    assert any("mask c.png is (6, 6)" in str(w.message) for w in record)
    # size and mode: caught at index time from the headers
    assert [Path(p).name for p, _ in ds.skipped] == ["c.png", "d.png"]
    assert "mode RGB" in ds.skipped[1][1]
    with pytest.warns(UserWarning, match=r"mask b.png has values \[7\]"):
        items = [ds[i] for i in range(len(ds))]  # values: caught at load time, replaced
    for image, mask in items:
        assert image.shape == (3, 8, 8) and mask.dtype == torch.long
        assert torch.equal(mask, torch.from_numpy(good).long())
    assert len(ds.skipped) == 3


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda r: _png(r / "images" / "a.png", 1), r"lacks the folder\(s\) \['masks'\]"),
        (lambda r: ((r / "images").mkdir(), (r / "masks").mkdir()), "holds no images"),
        (
            lambda r: (_seg_pair(r, "a", np.zeros((8, 8))), _png(r / "images" / "b.png", 1)),
            r"1 image\(s\) without a mask \['b'\]",
        ),
    ],
)
def test_segmentation_layout_errors(tmp_path: Path, make, match: str) -> None:
    make(tmp_path)
    with pytest.raises(DataLayoutError, match=match) as err:
        SegmentationFolderDataset(tmp_path, num_classes=2)
    assert "masks/" in str(err.value) and "same stem" in str(err.value)


def test_synthetic_dataset_reads_the_manifest(tmp_path: Path) -> None:
    generate("cue-seg", tmp_path / "seg", n=4, image_size=32, seed=2)
    generate("pathfinder", tmp_path / "pf", n=4, image_size=32, seed=2)
    seg = SyntheticDataset(tmp_path / "seg", transform=seg_train_transform(16))
    assert seg.classes[0] == "background" and len(seg) == 4
    image, mask = seg[1]
    assert image.shape == (3, 16, 16) and mask.shape == (16, 16)
    assert int(mask.max()) < len(seg.classes)
    pf = SyntheticDataset(tmp_path / "pf", indices=[3, 1])
    labels = [s["label"] for s in pf.manifest["samples"]]
    assert [pf[0][1], pf[1][1]] == [labels[3], labels[1]]
    assert pf[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="not found"):
        SyntheticDataset(tmp_path)
