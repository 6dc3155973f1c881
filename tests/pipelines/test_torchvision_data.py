"""``data.task: torchvision-cls`` (issue 16): the prepare stage on a torchvision data set by
name, and the stages' readers on its output. The data sets are tiny MNIST-family sets written in
their own IDX files (:func:`conftest.mnist_like`), so no download or system package is needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.cli import main
from pipelines.config import Params
from pipelines.data import data_fingerprint, held_split, native_size, open_split, stream
from pipelines.stages.prepare import part_split, prepare


def params(root: Path, **data) -> Params:
    base = {
        "task": "torchvision-cls",
        "dataset": "FashionMNIST",
        "root": str(root),
        "num_samples": None,
        "val_fraction": 0.25,
        "grid_samples": 4,
    }
    return Params.model_validate({"seed": 3, "data": {**base, **data}})


def test_part_split_keeps_the_test_part_and_carves_val_from_train() -> None:
    s = part_split(60, 10, None, 0.2, seed=1)
    assert s["test"] == list(range(60, 70))
    assert (len(s["val"]), len(s["train"])) == (12, 48)
    assert sorted(s["train"] + s["val"]) == list(range(60))
    assert s == part_split(60, 10, None, 0.2, seed=1) and s != part_split(60, 10, None, 0.2, 2)
    capped = part_split(60, 10, 14, 0.25, seed=1)  # both parts in their ratio, 6:1
    assert len(capped["test"]) == 2 and len(capped["train"]) + len(capped["val"]) == 12
    assert all(i >= 60 for i in capped["test"]) and all(i < 60 for i in capped["train"])
    with pytest.raises(ValueError, match="too few"):
        part_split(1, 10, None, 0.2, seed=1)  # a train part of one: no val and train


def test_prepare_splits_by_the_data_sets_parts(tmp_path: Path, mnist_like) -> None:
    data = mnist_like(tmp_path / "ext", n_train=40, n_test=10)
    out, reports = tmp_path / "prepared", tmp_path / "reports"
    report = prepare(params(tmp_path / "ext"), out, reports)

    splits = json.loads((out / "splits.json").read_text())
    assert splits["task"] == "torchvision-cls" and splits["kind"] == "cls"
    assert splits["dataset"] == "FashionMNIST" and splits["root"] == str(tmp_path / "ext")
    assert splits["test"] == [f"test/{i:05d}" for i in range(10)]  # torchvision's test part
    assert len(splits["val"]) == 10 and len(splits["train"]) == 30
    train_part = {f"train/{i:05d}" for i in range(40)}
    assert set(splits["train"]) | set(splits["val"]) == train_part
    assert not set(splits["train"]) & set(splits["val"])

    m = report["metrics"]
    assert (m["num_samples"], m["num_train"], m["num_val"], m["num_test"]) == (50, 30, 10, 10)
    assert m["num_skipped"] == 0 and m["num_classes"] == 10 and m["num_large"] == 0
    assert report["classes"][0] == "T-shirt/top" and report["image_sizes"] == {"28x28": 50}
    assert report["source"]["parts"] == {"train": 40, "test": 10}
    assert report["class_balance"]["test"] == [0.1] * 10  # labels 0..9 once each
    assert (reports / "samples.png").stat().st_size > 1000
    assert (reports / "class_balance.csv").read_text().startswith("split,class,fraction")

    # The stages' readers: RGB images with the bytes written, at the data set's one size.
    test = open_split("test", out)
    assert len(test) == 10
    for i in (0, 7):
        image, label = test[i]
        assert image.shape == (3, 28, 28) and label == int(data["test"][1][i])
        for c in range(3):
            np.testing.assert_allclose(image[c].numpy(), data["test"][0][i] / 255, atol=1e-6)
    val = open_split("val", out)
    first = int(splits["val"][0].split("/")[1])
    assert val[0][1] == int(data["train"][1][first])
    assert native_size(out) == native_size(out, largest=64) == 28
    held = held_split(out, "train", 8, 28)
    x, y, skipped = next(iter(stream(held.open())))
    assert x.shape == (8, 3, 28, 28) and x.dtype == torch.float32 and held.kind == "cls"
    assert skipped.tolist() == [0] * 8
    first = int(splits["train"][0].split("/")[1])
    assert torch.equal(
        (x[0, 0] * 255).round().to(torch.uint8), torch.from_numpy(data["train"][0][first])
    )
    assert y.tolist() == [int(data["train"][1][int(k.split("/")[1])]) for k in splits["train"][:8]]


def test_num_samples_caps_the_images_used(tmp_path: Path, mnist_like) -> None:
    mnist_like(tmp_path / "ext", n_train=60, n_test=10)
    report = prepare(params(tmp_path / "ext", num_samples=21), tmp_path / "p", tmp_path / "r")
    m = report["metrics"]
    assert m["num_samples"] == 21 and m["num_test"] == 3 and m["num_train"] + m["num_val"] == 18
    assert sum(report["image_sizes"].values()) == 21
    splits = json.loads((tmp_path / "p" / "splits.json").read_text())
    assert all(k.startswith("test/") for k in splits["test"])
    assert all(k.startswith("train/") for k in splits["train"] + splits["val"])


def test_prepare_extracts_a_gzipped_only_layout(tmp_path: Path, mnist_like) -> None:
    data = mnist_like(tmp_path / "ext", gz=True)
    raw = tmp_path / "ext" / "FashionMNIST" / "raw"
    assert not (raw / "t10k-images-idx3-ubyte").exists()
    prepare(params(tmp_path / "ext"), tmp_path / "p", tmp_path / "r")
    assert (raw / "t10k-images-idx3-ubyte").is_file()
    image, _ = open_split("test", tmp_path / "p")[4]
    np.testing.assert_allclose(image[1].numpy(), data["test"][0][4] / 255, atol=1e-6)


def test_fingerprint_follows_the_data_not_only_the_layout(tmp_path: Path, mnist_like) -> None:
    def fingerprint(name: str, tag: str) -> str:
        out = tmp_path / tag / "prepared"
        prepare(params(tmp_path / "ext", dataset=name), out, tmp_path / tag / "reports")
        return data_fingerprint(out)

    mnist_like(tmp_path / "ext", seed=0)
    first = fingerprint("FashionMNIST", "a")
    assert fingerprint("FashionMNIST", "b") == first  # the same data: the same runs resume
    mnist_like(tmp_path / "ext", seed=1)  # same names, sizes and labels; other pixels
    assert fingerprint("FashionMNIST", "c") != first
    mnist_like(tmp_path / "ext", name="MNIST", seed=1)  # the same bytes as another data set
    assert fingerprint("MNIST", "d") not in (first, fingerprint("FashionMNIST", "e"))


def test_generated_tasks_write_the_same_splits_file_as_before(tmp_path: Path) -> None:
    """A torchvision data set's entries are its own: a generated task's splits.json (and so its
    data fingerprint, part of every Ray run name) keeps its keys."""
    data = {"num_samples": 12, "image_size": 32, "large": {"num_samples": 0}, "grid_samples": 2}
    prepare(Params.model_validate({"data": data}), tmp_path / "p", tmp_path / "r")
    splits = json.loads((tmp_path / "p" / "splits.json").read_text())
    assert list(splits) == ["task", "kind", "classes", "root", "large", "train", "val", "test"]
    assert "source" not in json.loads((tmp_path / "r" / "report.json").read_text())


def test_cli_says_how_to_get_a_missing_data_set(tmp_path: Path, capsys) -> None:
    p = tmp_path / "params.yaml"
    p.write_text(
        f"data:\n  task: torchvision-cls\n  dataset: FashionMNIST\n  root: {tmp_path / 'ext'}\n"
    )
    out = ["--out", str(tmp_path / "o"), "--reports", str(tmp_path / "r")]
    assert main(["prepare", "--params", str(p), *out]) == 2
    err = capsys.readouterr().err
    assert f"data.root: FashionMNIST (train part) could not be read from {tmp_path}" in err
    assert "FashionMNIST/" in err and "train-images-idx3-ubyte" in err  # the layout
    assert "make fashion-mnist" in err and "apt-get install dataset-fashion-mnist" in err
    assert "data.download: true" in err
    assert not (tmp_path / "o").exists()
    assert main(["prepare", "--params", str(p), "--set", "data.dataset=Fashion"]) == 2
    err = capsys.readouterr().err
    assert "data.dataset: Input should be 'MNIST', 'FashionMNIST'" in err
