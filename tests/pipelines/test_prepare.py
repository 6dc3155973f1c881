"""The prepare stage: splits, report, atomic output, folder data with bad files, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.config import Params
from pipelines.data import open_split
from pipelines.stages.prepare import prepare, split_indices


def params(**data) -> Params:
    base = {
        "num_samples": 24,
        "image_size": 32,
        "large": {"num_samples": 1, "image_size": 64},
        "grid_samples": 4,
    }
    return Params.model_validate({"seed": 3, "data": {**base, **data}})


def test_split_indices_partition() -> None:
    s = split_indices(50, 0.2, 0.1, seed=1)
    together = s["train"] + s["val"] + s["test"]
    assert sorted(together) == list(range(50))
    assert (len(s["val"]), len(s["test"])) == (10, 5)
    assert s == split_indices(50, 0.2, 0.1, seed=1)
    assert s != split_indices(50, 0.2, 0.1, seed=2)


def test_prepare_generated(tmp_path: Path) -> None:
    out, reports = tmp_path / "prepared", tmp_path / "reports"
    report = prepare(params(), out, reports)
    m = report["metrics"]
    assert m["num_train"] + m["num_val"] + m["num_test"] == 24 and m["num_skipped"] == 0
    assert (reports / "samples.png").stat().st_size > 1000
    assert json.loads((reports / "metrics.json").read_text()) == m
    assert not (tmp_path / ".prepared.partial").exists()
    # Pixel balance is measured from the masks: recompute it independently for train.
    train = open_split("train", out)
    counts = np.zeros(m["num_classes"])
    for _, mask in train:
        counts += np.bincount(mask.numpy().ravel(), minlength=m["num_classes"])
    np.testing.assert_allclose(report["class_balance"]["train"], counts / counts.sum(), atol=1e-9)
    # Splits are disjoint and cover every sample.
    splits = json.loads((out / "splits.json").read_text())
    names = splits["train"] + splits["val"] + splits["test"]
    assert len(set(names)) == 24
    assert len(open_split("test", out, large=True)) == 1


def _png(path: Path, value: int, size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_prepare_folder_counts_corrupt_files(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        for i in range(6):
            _png(root / c / f"{i}.png", 40 * i)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    full = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(full[: len(full) // 2])
    with pytest.warns(UserWarning, match="skipping"):
        report = prepare(params(task="folder-cls", root=str(root)), tmp_path / "p", tmp_path / "r")
    assert report["metrics"]["num_samples"] == 12
    assert report["metrics"]["num_skipped"] == 2
    assert {Path(s["path"]).name for s in report["skipped"]} == {"broken.png", "truncated.png"}
    assert report["classes"] == ["cat", "dog"]
    assert sum(len(open_split(s, tmp_path / "p")) for s in ("train", "val", "test")) == 12


def test_failed_run_leaves_previous_output_intact(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "prepared"
    prepare(params(), out, tmp_path / "reports")
    before = (out / "splits.json").read_text()

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr("pipelines.stages.prepare.class_balance", boom)
    with pytest.raises(RuntimeError):
        prepare(params(num_samples=30), out, tmp_path / "reports")
    assert (out / "splits.json").read_text() == before


def test_cli_reports_bad_params_and_layout(tmp_path: Path, capsys) -> None:
    p = tmp_path / "params.yaml"
    p.write_text("data:\n  task: folder-cls\n  root: " + str(tmp_path / "empty") + "\n")
    (tmp_path / "empty").mkdir()
    assert main(["prepare", "--params", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "class_a/" in err  # the expected layout is shown
    assert main(["prepare", "--params", str(p), "--set", "data.nope=1"]) == 2
    assert "data.nope: unknown key" in capsys.readouterr().err


def test_cli_logs_stage_to_mlflow(tmp_path: Path) -> None:
    import mlflow

    p = tmp_path / "params.yaml"
    p.write_text(
        "tracking: {experiment: t}\ndata: {num_samples: 12, image_size: 32,"
        " large: {num_samples: 0}, grid_samples: 2}\n"
    )
    args = [
        "prepare",
        "--params",
        str(p),
        "--out",
        str(tmp_path / "o"),
        "--reports",
        str(tmp_path / "r"),
    ]
    assert main(args) == 0
    runs = mlflow.search_runs(experiment_names=["t"], output_format="list")
    assert len(runs) == 1 and runs[0].data.tags["gattn.stage"] == "prepare"
    assert runs[0].data.metrics["num_samples"] == 12
    assert runs[0].data.params["data.image_size"] == "32"
    artifacts = {
        a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "prepare")
    }
    assert "prepare/samples.png" in artifacts


# --- detection ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_det(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """tiny-det prepared at 32 px (one object per image), one large image."""
    tmp = tmp_path_factory.mktemp("tiny-det")
    report = prepare(params(task="tiny-det", num_samples=12), tmp / "prepared", tmp / "reports")
    return tmp, report


def test_prepare_tiny_det(tiny_det: tuple[Path, dict]) -> None:
    from pycocotools.coco import COCO

    tmp, report = tiny_det
    out, m = tmp / "prepared", report["metrics"]
    splits = json.loads((out / "splits.json").read_text())
    assert splits["kind"] == "det" and splits["category_ids"] == [1, 2, 3]
    assert report["classes"] == splits["classes"] == ["cue_red", "cue_green", "cue_blue"]
    assert m["num_skipped"] == 0 and m["num_train"] + m["num_val"] + m["num_test"] == 12
    boxes = 0
    for split in ("train", "val", "test"):
        coco = COCO(str(out / "coco" / f"{split}.json"))  # each split's own COCO file
        images = coco.loadImgs(coco.getImgIds())
        names = sorted(f"images/{im['file_name']}" for im in images)
        assert names == sorted(splits[split])
        assert all((out / splits["root"] / n).is_file() for n in names)
        anns = coco.loadAnns(coco.getAnnIds())
        boxes += len(anns)
        counts = np.bincount([a["category_id"] - 1 for a in anns], minlength=3)
        np.testing.assert_allclose(report["class_balance"][split], counts / counts.sum())
        # The split the later stages open holds the same boxes, as labels 0..K-1.
        opened = open_split(split, out)
        assert len(opened) == len(images)
        assert sum(len(t["labels"]) for _, t in opened) == len(anns)
    assert m["num_boxes"] == boxes >= 12 and m["num_crowd_dropped"] == 0
    large = open_split("test", out, large=True)
    image, target = large[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) >= 1
    assert (tmp / "reports" / "samples.png").stat().st_size > 1000


def test_prepare_folder_det_counts_corrupt_files(tmp_path: Path, capsys) -> None:
    root = tmp_path / "photos"
    images, annotations = [], []
    for i in range(6):
        _png(root / "images" / f"{i}.png", 40 * i)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 16, "height": 16})
        annotations.append(
            {"id": i + 1, "image_id": i + 1, "category_id": 10 + i % 2, "bbox": [1, 2, 5, 6]}
        )
    (root / "images" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 11, "name": "dog"}, {"id": 10, "name": "cat"}],
    }
    (root / "annotations.json").write_text(json.dumps(coco))
    with pytest.warns(UserWarning, match="skipping"):
        report = prepare(params(task="folder-det", root=str(root)), tmp_path / "p", tmp_path / "r")
    assert report["metrics"]["num_samples"] == 5 and report["metrics"]["num_skipped"] == 1
    assert report["classes"] == ["cat", "dog"] and report["metrics"]["num_boxes"] == 5
    kept = [im for s in ("train", "val", "test") for im in open_split(s, tmp_path / "p")]
    assert sorted(t["image_id"] for _, t in kept) == [1, 2, 3, 4, 5]
    # A bad annotation file stops the command with its entry named, without a traceback.
    coco["annotations"][0]["bbox"] = [1, 2, -5, 6]
    (root / "annotations.json").write_text(json.dumps(coco))
    p = tmp_path / "params.yaml"
    p.write_text(f"data:\n  task: folder-det\n  root: {root}\n")
    assert main(["prepare", "--params", str(p), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "annotations[0] (id 1): bbox [1, 2, -5, 6] has width or height <= 0" in err
