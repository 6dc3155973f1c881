"""The pipeline's results on the benchmark, gathered from the stage reports of the last
``make run`` (nothing is trained here): the local baseline against each global module from
the tune stage's trials (quality after the short trial training, measured training-step peak
memory, images/s), the fine-tuned champion (ERF area, with and without pretrained weights
where they apply) and the large-image evaluation (sliding window with and without global
feedback, TTA on and off).

Run after ``make run``::

    python benchmarks/pipeline_results.py   # -> benchmarks/results/pipeline.{json,md}

It also fills the README's results tables (between its ``<!-- trials -->``, ``<!-- champion -->``
and ``<!-- large -->`` markers), so the README quotes the last ``make run`` and nobody copies
figures by hand (``--no-readme``: not).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fill_readme, markdown_table, write_results  # noqa: E402

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


LARGE = {  # evaluate's set/mode -> the README's row
    "large.resize": "resized to the training size",
    "large.whole": "whole image at full size (the CNN takes any size)",
    "large.sliding": "sliding windows at the training size",
    "large.sliding_global": "sliding windows + global-context feedback",
    "large.sliding_global_tta": "sliding + feedback + TTA (scales × flip)",
}


def readme_tables(
    trials: list[dict[str, Any]], finetune: dict[str, Any], evaluate: dict[str, Any], summary: str
) -> dict[str, str]:
    """The README's results tables, by marker (``summary``: the champion's config)."""
    metric = finetune["metric"]
    shown = [
        {
            "model": r["family"],
            "global module": r["global module"],
            "batch @ px": r["batch @ px"],
            f"val {metric}": f"{r[metric]:.3f}",
            "epochs": r["epochs"],
            "peak MiB": f"{r['peak MiB']:.1f}",
            "pretrained tensors": r["pretrained tensors"],
        }
        for r in trials
    ]
    test = evaluate.get("test.plain", {}).get(metric)
    test_tta = evaluate.get("test.plain_tta", {}).get(metric)
    champion = [
        {
            "champion": f"{summary}, {finetune['epochs']} epochs",
            f"search's best trial ({metric})": f"{finetune['search_quality']:.3f}",
            "champion, same val images": f"{finetune['search_split_score']:.3f}",
            "gain over search": f"{finetune['gain_over_search']:+.3f}",
            "test": "–" if test is None else f"{test:.3f}",
            "test + TTA": "–" if test_tta is None else f"{test_tta:.3f}",
        }
    ]
    large = [
        {"inference on the large test images": name, metric: f"{evaluate[key][metric]:.3f}"}
        for key, name in LARGE.items()
        if key in evaluate
    ]
    return {
        "trials": markdown_table(shown, list(shown[0]) if shown else ["model"]),
        "champion": markdown_table(champion, list(champion[0])),
        "large": markdown_table(large, list(large[0]) if large else ["inference"]),
    }


def main(argv: list[str] | None = None) -> int:
    no_readme = "--no-readme" in (sys.argv[1:] if argv is None else argv)
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
    if not no_readme:
        best = _json(Path("models/tune/best.json"))
        summary = best["per_budget"][best["selected_budget"]]["summary"]
        for marker, table in readme_tables(trials, finetune, evaluate, summary).items():
            fill_readme(marker, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
