"""The pipeline's results on the benchmark, gathered from the stage reports of the last
``make run`` (nothing is trained here): the local baseline against each global module from
the tune stage's trials (quality after the short trial training, measured training-step peak
memory, images/s), the fine-tuned champion (ERF area, with and without pretrained weights
where they apply) and the large-image evaluation (sliding window with and without global
feedback, TTA on and off).

Run after ``make run``::

    python benchmarks/pipeline_results.py   # -> benchmarks/results/pipeline.{json,md}
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402

REPORTS = Path("reports")


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `make run` first")
    return json.loads(path.read_text())


def trial_rows(trials: Path) -> list[dict[str, Any]]:
    """One row per trained tune trial, best quality first, the local baseline marked."""
    rows = []
    with open(trials, newline="") as f:
        for t in csv.DictReader(f):
            if t["status"] != "ok":
                continue
            module = t["module"]
            if module != "none":
                module += f" ({t['module_size']}, x{t['num_blocks']} @ {t['position']})"
            rows.append(
                {
                    "family": t["family"],
                    "global module": "none (local baseline)"
                    if module == "none" and t["family"] == "cnn"
                    else module,
                    "head": t["head"],
                    "batch @ px": f"{t['batch_size']} @ {t['img_size']}",
                    t["metric"]: float(t["quality"]),
                    "epochs": int(t["epochs"]),
                    "peak MiB": float(t["peak_memory_gib"]) * 1024,
                    "images/s": float(t["images_per_s"]),
                    "pretrained tensors": int(t["pretrained_tensors"] or 0),
                }
            )
    metric = next((k for k in ("miou", "accuracy") if rows and k in rows[0]), "miou")
    return sorted(rows, key=lambda r: -r[metric])


def main() -> int:
    trials = trial_rows(REPORTS / "tune" / "trials.csv")
    finetune = _json(REPORTS / "finetune" / "metrics.json")
    evaluate = _json(REPORTS / "evaluate" / "metrics.json")
    pretrain = _json(REPORTS / "pretrain" / "metrics.json")
    evals = [
        {"images": name.split(".")[0], "mode": name.split(".")[1], **values}
        for name, values in evaluate.items()
        if "." in name
    ]
    meta = {
        "command": "make run && python benchmarks/pipeline_results.py",
        "champion": f"{finetune['metric']} {finetune['best_score']:.3f} on val after "
        f"{finetune['epochs']} epochs (budget {finetune['budget_gib']} GiB); pretrained tensors "
        f"matched: {finetune['pretrained_matched']}",
        "champion_erf_area": evaluate.get("erf", {}),
        "pretrain_probe": {k: v for k, v in pretrain.items() if k.startswith("probe_")},
    }
    notes = (
        "## Large-image evaluation of the champion (`reports/evaluate/metrics.json`)\n\n"
        + markdown_table(evals, ["images", "mode", "accuracy", "miou", "ms_per_image"])
        + "\nTune trials train a few epochs on the default data (ASHA stops weak ones early: "
        "see `epochs`); quality is the trial's validation figure, memory the measured peak of "
        "one training step.\n"
    )
    columns = list(trials[0]) if trials else []
    json_path, md_path = write_results("pipeline", trials, columns, meta, notes)
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
