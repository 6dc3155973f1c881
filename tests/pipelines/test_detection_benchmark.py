"""``benchmarks/detection.py`` at a toy size: every piece writes a well-formed result, a rerun
skips the pieces done, and the table carries the rows, the command and the issue's targets."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _benchmark() -> ModuleType:
    path = ROOT / "benchmarks" / "detection.py"
    spec = importlib.util.spec_from_file_location("detection_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_one_step_pieces_write_the_table_and_a_rerun_skips_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _benchmark()
    argv = ["--work", str(tmp_path / "work"), "--results", str(tmp_path / "results")]
    argv += ["--no-readme", "--image-size", "64", "--train-images", "4", "--test-images", "2"]
    argv += ["--steps", "1", "--batch-size", "2", "--threads", "1", "--seeds", "0"]
    argv += ["--variants", "p3", "p2", "--cue-px", "6", "--cue-clearance", "0.2"]
    assert bench.main(argv) == 0
    assert "epoch 1/1 step 1/1" in capsys.readouterr().out
    generated = json.loads((tmp_path / "work" / "train" / "manifest.json").read_text())
    assert (generated["config"]["cue_px"], generated["config"]["cue_clearance"]) == (6, 0.2)
    pieces = sorted(p.name for p in (tmp_path / "work" / "pieces").glob("*.json"))
    assert [p.split("-")[:2] for p in pieces] == [["p2", "s0"], ["p3", "s0"]]

    table = json.loads((tmp_path / "results" / "detection.json").read_text())
    assert table["meta"]["command"].startswith("python benchmarks/detection.py --work")
    rows = {r["variant"]: r for r in table["rows"]}
    assert set(rows) == {"p3", "p2"}
    assert rows["p2"]["map_small"].endswith("n=1)") and rows["p2"]["map_large"] == "nan"
    assert rows["p3"]["img_s_vs_p3"] == rows["p3"]["peak_vs_p3"] == "1.00x"
    assert list(table["meta"]["targets"]) == ["p2: AP_small above p3 on every seed"]
    runs = json.loads((tmp_path / "results" / "detection_runs.json").read_text())
    assert {r["variant"] for r in runs} == {"p3", "p2"}
    assert all(r["peak_mib"] > 0 and r["train_img_s"] > 0 for r in runs)
    assert all(0 <= r["map"] <= 1 and math.isnan(r["map_large"]) for r in runs)
    assert all(0 <= r["map_agnostic"] <= 1 for r in runs)
    assert sorted(p.name for p in (tmp_path / "work" / "pieces").glob("*.safetensors")) == [
        p.replace(".json", ".safetensors") for p in pieces
    ]
    assert "## Targets (issue 18)" in (tmp_path / "results" / "detection.md").read_text()

    assert bench.main(argv) == 0  # every piece cached: nothing trains again
    assert "epoch" not in capsys.readouterr().out
