"""Your own images at any size (issue 14), without Ray: the prepare stage indexes a folder of
mixed sizes and modes, and the splits the tune stage streams are held at the
largest trial resolution, not at the first image's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import load_params
from pipelines.data import held_split, native_size, stream
from pipelines.stages.prepare import prepare

ROOT = Path(__file__).resolve().parents[2]


def _folder(root: Path) -> Path:
    """Two classes; the first file (sorted) is tiny and greyscale, a later one is large."""
    rng = np.random.default_rng(0)
    sizes = [(8, 8), (300, 200), (40, 60), (33, 33), (64, 48), (17, 90)]
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, (h, w), dtype=np.uint8)
            image = Image.fromarray(pixels) if i % 2 == 0 else Image.fromarray(pixels).convert("P")
            image.save(root / c / f"{i}.png")
    return root


def test_folder_images_keep_their_sizes_and_tune_holds_them_at_its_largest_size(
    tmp_path: Path,
) -> None:
    root = _folder(tmp_path / "photos")
    params = load_params(
        ROOT / "params.yaml", ["data.task=folder-cls", f"data.root={root}", "data.grid_samples=2"]
    )
    report = prepare(params, tmp_path / "prepared", tmp_path / "reports")
    assert report["metrics"]["num_samples"] == 12 and not report["skipped"]
    assert report["image_sizes"]["300x200"] == 2 and report["image_sizes"]["8x8"] == 2

    largest = max(params.tune.img_sizes)
    size = native_size(tmp_path / "prepared", largest)
    assert size == largest  # not the first image's 8 px, nor the 300 px one
    held = held_split(tmp_path / "prepared", "train", None, size)
    images, targets, _ = next(iter(stream(held.open())))
    assert held.kind == "cls" and images.shape[1:] == (3, largest, largest)
    assert len(targets) == images.shape[0] == len(held.open())


@pytest.mark.parametrize("largest", [None, 64])
def test_generated_data_is_held_at_its_own_size(prepared: Path, largest: int | None) -> None:
    assert native_size(prepared, largest) == 32  # the prepared fixture: cue-seg at 32 px


def test_pretraining_batches_segmentation_photos_of_any_size(tmp_path: Path) -> None:
    """The pretrain stage's views (and its probe's) turn a mask into its image-level label, so
    masks of different sizes never meet in one batch (collate failed on them)."""
    from torch.utils.data import DataLoader

    from gattn.data import SegmentationFolderDataset
    from gattn.ssl.probe import image_labels
    from pipelines.config import PretrainParams
    from pipelines.stages.pretrain import probe_view, train_view

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i, (w, h) in enumerate([(40, 30), (17, 64), (50, 50)]):
        Image.fromarray(np.full((h, w, 3), 60 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
        mask = np.zeros((h, w), np.uint8)
        mask[: h // 2] = i + 1
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
    plain = SegmentationFolderDataset(tmp_path, None)
    expected = [int(image_labels(plain[i][1][None])[0]) for i in range(3)]
    for view in (train_view(PretrainParams(img_size=16)), probe_view(16)):
        ds = SegmentationFolderDataset(tmp_path, None, transform=view)
        images, labels = next(iter(DataLoader(ds, batch_size=3)))
        assert images.shape == (3, 3, 16, 16) and labels.tolist() == expected == [1, 2, 3]
