"""Torchvision data sets by name: samples like the folder data sets', the gzipped-only layout
extracted, a missing or unknown data set a clear error. The files are tiny MNIST-family sets
written in their own IDX format (:func:`conftest.mnist_like`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from gattn.data import DataLayoutError, TorchvisionDataset
from gattn.data.torchvision_sets import TRAIN_TEST, sample_key, unpack_gzipped


def _uint8(image: tv_tensors.Image) -> tv_tensors.Image:
    return image


def test_samples_are_rgb_images_with_the_bytes_written(tmp_path: Path, mnist_like) -> None:
    data = mnist_like(tmp_path)
    ds = TorchvisionDataset("FashionMNIST", tmp_path, transform=_uint8)
    assert len(ds) == 40 and ds.part_size("train") == 30 and ds.part_size("test") == 10
    assert ds.samples[0] == ("train/00000", 0) and ds.samples[30] == ("test/00000", 0)
    assert ds.samples[-1] == ("test/00009", 9)
    assert ds.classes[0] == "T-shirt/top" and len(ds.classes) == ds.num_classes == 10
    assert ds.task == "cls" and ds.skipped == []
    for index, (part, i) in ((7, ("train", 7)), (33, ("test", 3))):
        image, label = ds[index]
        assert isinstance(image, tv_tensors.Image)
        assert image.dtype == torch.uint8 and image.shape == (3, 28, 28)
        want = torch.from_numpy(data[part][0][i])
        assert all(torch.equal(image[c], want) for c in range(3))  # grey repeated to RGB
        assert label == int(data[part][1][i])


def test_default_transform_and_dataloader_match_the_folder_sets(tmp_path: Path, mnist_like) -> None:
    data = mnist_like(tmp_path, name="MNIST")
    ds = TorchvisionDataset("MNIST", tmp_path)
    image, _ = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, 28, 28)
    np.testing.assert_allclose(image[0].numpy(), data["train"][0][1] / 255, atol=1e-6)
    images, labels = next(iter(DataLoader(ds, batch_size=8)))
    assert images.shape == (8, 3, 28, 28) and labels.tolist() == list(range(8))
    grey = TorchvisionDataset("MNIST", tmp_path, mode="L", transform=_uint8)
    assert grey[0][0].shape == (1, 28, 28)
    assert ds.classes[:2] == ["0 - zero", "1 - one"]  # the data set's names, all of them


def test_classes_are_the_data_sets_even_when_few_appear(tmp_path: Path, mnist_like) -> None:
    mnist_like(tmp_path, n_train=4, n_test=2)  # labels 0-3 only
    ds = TorchvisionDataset("FashionMNIST", tmp_path)
    assert ds.num_classes == 10 and ds.classes[-1] == "Ankle boot"


def test_gzipped_files_alone_are_extracted(tmp_path: Path, mnist_like) -> None:
    data = mnist_like(tmp_path, gz=True)
    raw = tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]
    ds = TorchvisionDataset("FashionMNIST", tmp_path, transform=_uint8)
    assert (raw / "train-images-idx3-ubyte").is_file() and not list(raw.glob(".*partial"))
    assert torch.equal(ds[35][0][0], torch.from_numpy(data["test"][0][5]))
    assert unpack_gzipped("FashionMNIST", tmp_path) == []  # already there: nothing to do


def test_gzipped_files_reached_through_links_are_extracted_next_to_them(
    tmp_path: Path, mnist_like
) -> None:
    """The documented Debian set-up: the .gz files live elsewhere (read-only), linked in."""
    mnist_like(tmp_path / "system", gz=True)
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for packed in (tmp_path / "system" / "FashionMNIST" / "raw").iterdir():
        (raw / packed.name).symlink_to(packed)
    written = unpack_gzipped("FashionMNIST", tmp_path / "root")
    assert len(written) == 4 and all(p.parent == raw and not p.is_symlink() for p in written)
    assert len(TorchvisionDataset("FashionMNIST", tmp_path / "root")) == 40


def test_a_corrupt_gzip_is_a_layout_error_that_leaves_nothing(tmp_path: Path, mnist_like) -> None:
    mnist_like(tmp_path, gz=True)
    raw = tmp_path / "FashionMNIST" / "raw"
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not gzip really")
    with pytest.raises(DataLayoutError, match="cannot extract .*gunzip -k"):
        TorchvisionDataset("FashionMNIST", tmp_path)
    assert not (raw / "train-images-idx3-ubyte").exists()
    assert not list(raw.glob(".*partial"))


def test_a_missing_data_set_says_where_and_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataLayoutError) as err:
        TorchvisionDataset("FashionMNIST", tmp_path)
    message = str(err.value)
    assert "FashionMNIST/" in message and "train-images-idx3-ubyte" in message  # the layout
    assert "download=True" in message
    assert "apt-get install dataset-fashion-mnist" in message
    with pytest.raises(DataLayoutError, match="CIFAR10.*download=True"):
        TorchvisionDataset("CIFAR10", tmp_path)


def test_an_unknown_name_lists_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'ImageNet21k' is not supported.*FashionMNIST"):
        TorchvisionDataset("ImageNet21k", tmp_path)


def test_every_supported_name_is_a_torchvision_class() -> None:
    import torchvision.datasets

    for name in TRAIN_TEST:
        assert isinstance(getattr(torchvision.datasets, name), type), name


def test_sample_keys_sort_in_index_order() -> None:
    assert sample_key("train", 42, 60000) == "train/00042"
    assert sample_key("test", 7, 10) == "test/00007"
    keys = [sample_key("train", i, 200_000) for i in (9, 10, 199_999)]
    assert keys == sorted(keys) and keys[-1] == "train/199999"
