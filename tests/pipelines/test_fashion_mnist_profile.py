"""The Fashion-MNIST profile (params-fashion-mnist.yaml, issue 16 §5) and its results table:
the tune stage can pick the pretrained encoder (its ``ssl`` family is the backbone the pretrain
stage builds, so the encoder's weights load), pretrained and scratch run side by side at the
same settings, and ``benchmarks/fashion_mnist_results.py`` reads the stages' reports."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from gattn.models.pretrained import same_backbone
from pipelines.config import load_params
from pipelines.stages.pretrain import encoder_config
from pipelines.stages.tune.space import model_config

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "params-fashion-mnist.yaml"


def _results_module():
    path = ROOT / "benchmarks" / "fashion_mnist_results.py"
    spec = importlib.util.spec_from_file_location("fashion_mnist_results", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_profile_is_fashion_mnist_with_a_pretrained_and_a_scratch_vit() -> None:
    p = load_params(PROFILE)
    assert (p.data.task, p.data.dataset, p.data.kind) == ("torchvision-cls", "FashionMNIST", "cls")
    assert p.pretrain.method == "dino"
    inits = {f.init for f in p.tune.families.values()}
    assert inits == {"ssl", "scratch"}
    # The ssl family is the encoder the pretrain stage builds (same name and arguments):
    # otherwise its trials silently start from scratch (load_pretrained skips the weights).
    encoder = encoder_config(p.pretrain)
    for name in p.tune.families:
        point = next(q for q in p.tune.points("cls") if q["family"] == name)
        cfg = model_config(point, p.tune, "cls", 10, 3)
        assert same_backbone(encoder, cfg), (name, encoder, cfg)
        assert cfg["img_size"] == p.pretrain.img_size
    # One preset trial per family, the same in everything else.
    points = p.tune.points("cls")
    assert sorted(q["family"] for q in points) == sorted(p.tune.families)
    assert len({json.dumps({k: v for k, v in q.items() if k != "family"}) for q in points}) == 1


def _write_reports(root: Path) -> None:
    (root / "reports" / "pretrain").mkdir(parents=True)
    (root / "reports" / "tune").mkdir()
    (root / "reports" / "finetune").mkdir()
    (root / "reports" / "evaluate").mkdir()
    (root / "models" / "tune").mkdir(parents=True)
    probe = {"probe_knn_acc": 0.70, "probe_knn_acc_random": 0.62}
    probe |= {"probe_linear_acc": 0.75, "probe_linear_acc_random": 0.72}
    (root / "reports" / "pretrain" / "metrics.json").write_text(json.dumps(probe))
    point = load_params(PROFILE).tune.points("cls")[0]
    rows = [
        {**point, "trial": "a", "family": "vit", "quality": "0.80", "epochs": "3"},
        {**point, "trial": "b", "family": "vit_scratch", "quality": "0.60", "epochs": "3"},
        {**point, "trial": "c", "family": "vit_scratch", "quality": "0.65", "lr": "0.002"},
        {**point, "trial": "d", "family": "vit", "quality": "0.0", "status": "error"},
    ]
    columns = [*point, "trial", "status", "quality", "epochs", "pretrained_tensors"]
    with open(root / "reports" / "tune" / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for r in rows:
            loaded = "53" if r["family"] == "vit" else "0"
            writer.writerow({"status": "ok", "epochs": "1", "pretrained_tensors": loaded, **r})
    best = {"selected_budget": "0.25", "per_budget": {"0.25": {"trial": "a", "summary": "vit"}}}
    (root / "models" / "tune" / "best.json").write_text(json.dumps(best))
    (root / "reports" / "finetune" / "metrics.json").write_text(json.dumps({"epochs": 3}))
    evaluate = {"test.plain": {"accuracy": 0.81}, "test.plain_tta": {"accuracy": 0.82}}
    (root / "reports" / "evaluate" / "metrics.json").write_text(json.dumps(evaluate))
    details = {"results": {"test/plain": {"confusion": [[3, 1], [0, 4]]}}}
    (root / "reports" / "evaluate" / "details.json").write_text(json.dumps(details))


def test_results_table_puts_pretrained_beside_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _results_module()
    _write_reports(tmp_path)
    monkeypatch.chdir(tmp_path)
    written = {}

    def write_results(name, rows, columns, meta, notes=""):  # noqa: ANN001, ANN202
        written.update(name=name, rows=rows, meta=meta)
        md = tmp_path / "out.md"
        md.write_text(module.markdown_table(rows, columns))
        return tmp_path / "out.json", md

    filled = {}
    monkeypatch.setattr(module, "write_results", write_results)
    monkeypatch.setattr(module, "fill_readme", lambda marker, table: filled.update({marker: table}))
    assert module.main([]) == 0
    knn = next(r for r in written["rows"] if r["measure"].startswith("frozen encoder, k-NN"))
    assert (knn["pretrained (DINO)"], knn["scratch (random init)"], knn["gain"]) == (
        "0.700",
        "0.620",
        "+0.080",
    )
    preset = next(r for r in written["rows"] if r["measure"].startswith("tune: preset"))
    assert (preset["pretrained (DINO)"], preset["scratch (random init)"]) == ("0.800", "0.600")
    best = next(r for r in written["rows"] if r["measure"].startswith("tune: best"))
    assert (best["scratch (random init)"], best["gain"]) == ("0.650", "+0.150")
    champion = written["rows"][-1]
    assert champion["measure"].startswith("champion (vit, fine-tuned 3 epochs)")
    assert "8 images" in champion["measure"]
    assert champion["pretrained (DINO)"] == "0.810 (0.820)"
    assert champion["scratch (random init)"] == "not picked"
    assert written["meta"]["families"]["vit"]["pretrained_tensors"] == 53
    assert (
        "| frozen encoder, k-NN accuracy (val) | 0.700 | 0.620 | +0.080 |"
        in filled["fashion-mnist"]
    )
