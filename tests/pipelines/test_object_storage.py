"""``data.root`` on object storage (issue 17): the folder tasks read ``s3://`` images, tested
against a real S3-compatible server (moto's, in this process's thread) on 127.0.0.1 at a free
port, not a mock: prepare indexes the bucket, a tune trial streams its batches from it (in a
loader worker too) and skips a corrupt object."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.config import TuneParams, load_params
from pipelines.data import held_split, open_split, stream
from pipelines.stages.prepare import prepare
from pipelines.stages.tune import stage, trial

moto_server = pytest.importorskip("moto.server")
fsspec = pytest.importorskip("fsspec")
pytest.importorskip("s3fs")
pytest.importorskip("upath")

ROOT = Path(__file__).resolve().parents[2]
BUCKET = "gattn-data"
FAMILIES = {"cnn": {"backbone": "gattn_local_cnn", "backbone_kwargs": {"widths": [8, 16]}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    """An S3 server on 127.0.0.1 holding ``cls/`` (2 classes x 8 images) and ``seg/``
    (6 images + masks); the environment points boto at it; stopped after the module."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        rng = np.random.default_rng(0)
        files = {}
        for c in ("cat", "dog"):
            for i in range(8):
                pixels = rng.integers(0, 256, (40 + 4 * i, 36, 3), dtype=np.uint8)
                files[f"{BUCKET}/cls/{c}/{i}.png"] = _png(pixels)
        for i in range(6):
            files[f"{BUCKET}/seg/images/{i}.png"] = _png(
                rng.integers(0, 256, (32, 32, 3), np.uint8)
            )
            mask = np.zeros((32, 32), np.uint8)
            mask[: 4 + 4 * i, :] = 1 + i % 2
            files[f"{BUCKET}/seg/masks/{i}.png"] = _png(mask)
        fs.pipe(files)
        fsspec.config.conf.pop("s3", None)
        yield fs
        fs.clear_instance_cache()
    server.stop()


def _prepare(tmp: Path, task: str, root: str) -> Path:
    overrides = [f"data.task={task}", f"data.root={root}", "data.grid_samples=2"]
    prepare(load_params(ROOT / "params.yaml", overrides), tmp / "prepared", tmp / "reports")
    return tmp / "prepared"


def test_prepare_indexes_a_bucket_and_stages_stream_from_it(s3: object, tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, "folder-cls", f"s3://{BUCKET}/cls")
    splits = json.loads((prepared / "splits.json").read_text())
    assert splits["root"] == f"s3://{BUCKET}/cls" and splits["classes"] == ["cat", "dog"]
    names = splits["train"] + splits["val"] + splits["test"]
    assert len(names) == 16 and all(n.startswith(("cat/", "dog/")) for n in names)

    held = held_split(prepared, "train", None, 32)
    images, labels, skipped = next(iter(stream(held.open(), batch_size=4, workers=1)))
    assert images.shape == (4, 3, 32, 32) and skipped.tolist() == [0] * 4
    first = splits["train"][0]
    assert labels[0] == ["cat", "dog"].index(first.split("/")[0])


@pytest.mark.slow  # its loader workers over object storage start by forkserver
@pytest.mark.filterwarnings("ignore:skipping unreadable sample")
def test_a_trial_reads_the_bucket_and_skips_a_corrupt_object(s3, tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, "folder-cls", f"s3://{BUCKET}/cls")
    first = json.loads((prepared / "splits.json").read_text())["train"][0]
    s3.pipe({f"{BUCKET}/cls/{first}": b"\x89PNG\r\n\x1a\n cut short"})  # after prepare
    p = TuneParams.model_validate(
        {"families": FAMILIES, "modules": ["none"], "epochs": 1, "loader_workers": 1}
    )
    point = load_params(ROOT / "params.yaml").tune.points("cls")[0]  # the local baseline
    sample = {**point, "batch_size": 4, "img_size": 32}
    row = trial.run_trial(sample, stage.data_context(prepared, None, p, seed=0), lambda r: None)
    assert row["status"] == "ok", row.get("traceback")
    assert row["skipped"] >= 1 and row["steps"] >= 1


def test_folder_seg_on_s3(s3: object, tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, "folder-seg", f"s3://{BUCKET}/seg")
    assert json.loads((prepared / "splits.json").read_text())["classes"] == ["0", "1", "2"]
    images, masks, _ = next(iter(stream(held_split(prepared, "val", None, 16).open())))
    assert images.shape[1:] == (3, 16, 16) and masks.shape[1:] == (16, 16)
    assert len(open_split("train", prepared)) + 2 == 6  # one val, one test image


def test_the_pretrain_and_finetune_workers_read_the_bucket(s3: object, tmp_path: Path) -> None:
    """Both stages' workers open the split through :func:`open_split`, one sample at a time:
    with an ``s3://`` root they read the bucket (here the views of one batch each)."""
    from torch.utils.data import DataLoader

    from pipelines.stages.finetune import train_transform
    from pipelines.stages.pretrain import train_split, train_view

    prepared = _prepare(tmp_path, "folder-cls", f"s3://{BUCKET}/cls")
    params = load_params(ROOT / "params.yaml")
    views, _ = next(
        iter(DataLoader(train_split(params.pretrain, prepared, train_view(params.pretrain)), 4))
    )
    assert views.shape[0] == 4
    images, labels = next(
        iter(DataLoader(open_split("train", prepared, train_transform(params.finetune, 32)), 4))
    )
    assert images.shape == (4, 3, 32, 32) and labels.shape == (4,)


def test_torchvision_sets_stay_local() -> None:
    with pytest.raises(ValueError, match="object storage"):
        load_params(ROOT / "params.yaml", ["data.task=torchvision-cls", "data.root=s3://b/x"])
