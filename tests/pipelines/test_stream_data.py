"""Splits read as streams (issue 17): a tune trial reads its own batches from the files, and
a file that turns unreadable after ``prepare`` is skipped and counted, never stopping a trial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import TuneParams, load_params
from pipelines.data import held_split, stream
from pipelines.stages.prepare import prepare
from pipelines.stages.tune import stage, trial

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {"cnn": {"backbone": "gattn_local_cnn", "backbone_kwargs": {"widths": [8, 16]}}}
# The pipeline's local baseline point at a small batch and size (on FAMILIES' tiny CNN).
SAMPLE = {
    **load_params(ROOT / "params.yaml").tune.points("cls")[0],
    "batch_size": 4,
    "img_size": 32,
}


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared ``folder-cls`` set of 2 x 10 images of 40 px; afterwards one training image
    is overwritten with bytes no decoder reads (prepare saw it whole)."""
    tmp = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp / "images" / c).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp / "images" / c / f"{i}.png")
    overrides = ["data.task=folder-cls", f"data.root={tmp / 'images'}", "data.grid_samples=2"]
    prepare(load_params(ROOT / "params.yaml", overrides), tmp / "prepared", tmp / "reports")
    first = json.loads((tmp / "prepared" / "splits.json").read_text())["train"][0]
    (tmp / "images" / first).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return tmp / "prepared"


def _params(**overrides: object) -> TuneParams:
    base = {"families": FAMILIES, "modules": ["none"], "epochs": 2, "points_to_evaluate": []}
    return TuneParams.model_validate({**base, **overrides})


@pytest.mark.filterwarnings("ignore:skipping unreadable sample")
@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_file_is_skipped_and_counted_by_a_trial(photos: Path, workers: int) -> None:
    p = _params(loader_workers=workers)
    context = stage.data_context(photos, None, p, seed=0)
    reports: list[dict] = []
    row = trial.run_trial(SAMPLE, context, reports.append)
    assert row["status"] == "ok", row.get("traceback")
    assert [r["epochs"] for r in reports] == [1, 2]
    # Read in each epoch (the first also in the measured step's batch when it holds it): at
    # least once per epoch, and every read of it is counted, in a worker or not.
    assert row["skipped"] >= 2
    assert reports[0]["skipped"] >= 1


@pytest.mark.filterwarnings("ignore:skipping unreadable sample")
def test_a_stream_batches_the_split_with_its_skips(photos: Path) -> None:
    held = held_split(photos, "train", None, 32)
    batches = list(stream(held.open(), batch_size=4))
    assert sum(len(b[0]) for b in batches) == len(held.open())
    assert batches[0][0].shape[1:] == (3, 32, 32) and type(batches[0][0]) is torch.Tensor
    assert [int(b[2].sum()) for b in batches] == [1] + [0] * (len(batches) - 1)
    counts = stage.split_class_counts(held, 2)
    assert int(counts.sum()) == len(held.open())


def test_a_split_named_relative_to_the_stage_opens_from_a_trial_folder(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stages name ``data/prepared`` relative to the project; Ray Tune runs each trial in
    a folder of its own, where the split must still open."""
    monkeypatch.chdir(photos.parent)
    held = held_split(Path(photos.name), "train", 4, 32)
    monkeypatch.chdir(tmp_path)  # as a trial: elsewhere
    assert len(held.open()) == 4
