"""The Fashion-MNIST pipeline's results, pretrained against scratch, gathered from the stage
reports of the last ``gattn pipeline --params params-fashion-mnist.yaml`` (nothing is trained
here):

- the pretrain stage's frozen probes (k-NN and linear, on the val split) of the DINO encoder
  and of the same encoder at its random init (``reports/pretrain/metrics.json``);
- the tune trials of the two ViT families, ``vit`` (``init: ssl``) and ``vit_scratch``
  (``init: scratch``): the preset point each ran at the same settings, and each family's best
  trial (``reports/tune/trials.csv``);
- the champion the search picked and fine-tuned, on the test split (``reports/evaluate``).

Run after the pipeline::

    python benchmarks/fashion_mnist_results.py   # -> benchmarks/results/fashion_mnist.{json,md}

It also fills the README's table between ``<!-- fashion-mnist -->`` and
``<!-- /fashion-mnist -->`` (``--no-readme``: not).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fill_readme, markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REPORTS = Path("reports")
PROFILE = ROOT / "params-fashion-mnist.yaml"
COMMAND = ".venv/bin/gattn pipeline --params params-fashion-mnist.yaml"


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `{COMMAND}` first")
    return json.loads(path.read_text())


def read_trials(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise SystemExit(f"{path}: missing; run `{COMMAND}` first")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _matches(row: Mapping[str, str], point: Mapping[str, Any]) -> bool:
    """Whether a trials.csv row (text) is the trial of the preset ``point``."""
    for key, value in point.items():
        cell = row.get(key, "")
        if isinstance(value, float | int) and not isinstance(value, bool):
            try:
                if abs(float(cell) - value) > 1e-12 * max(1.0, abs(value)):
                    return False
            except ValueError:
                return False
        elif str(value) != cell:
            return False
    return True


def family_rows(
    trials: Sequence[Mapping[str, str]],
    families: Mapping[str, str],
    points: Sequence[Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Per family (``{name: init}``): its preset point's trial and its best trained trial
    (quality, epochs, pretrained tensors loaded), from the rows of ``trials.csv``."""
    out: dict[str, dict[str, Any]] = {}
    for name in families:
        ok = [t for t in trials if t["family"] == name and t["status"] == "ok"]
        preset = next(
            (t for t in ok for p in points if p.get("family") == name and _matches(t, p)), None
        )
        best = max(ok, key=lambda t: float(t["quality"]), default=None)
        out[name] = {
            "trials": len(ok),
            "preset": None if preset is None else float(preset["quality"]),
            "preset_epochs": None if preset is None else int(preset["epochs"]),
            "best": None if best is None else float(best["quality"]),
            "best_trial": None if best is None else best["trial"],
            "pretrained_tensors": max((int(t["pretrained_tensors"] or 0) for t in ok), default=0),
        }
    return out


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def table_rows(
    pretrain: Mapping[str, Any],
    fams: Mapping[str, Mapping[str, Any]],
    ssl: str,
    scratch: str,
    champion: Mapping[str, Any],
) -> list[dict[str, str]]:
    """The README's rows: one per comparison, pretrained and scratch side by side."""
    a, b = fams[ssl], fams[scratch]

    def gain(x: float | None, y: float | None) -> str:
        return "–" if x is None or y is None else f"{x - y:+.3f}"

    rows = [
        {
            "measure": "frozen encoder, k-NN accuracy (val)",
            "pretrained (DINO)": _fmt(pretrain.get("probe_knn_acc")),
            "scratch (random init)": _fmt(pretrain.get("probe_knn_acc_random")),
        },
        {
            "measure": "frozen encoder, linear probe accuracy (val)",
            "pretrained (DINO)": _fmt(pretrain.get("probe_linear_acc")),
            "scratch (random init)": _fmt(pretrain.get("probe_linear_acc_random")),
        },
        {
            "measure": f"tune: preset trial, same settings ({a['preset_epochs']} epochs), val "
            "accuracy",
            "pretrained (DINO)": _fmt(a["preset"]),
            "scratch (random init)": _fmt(b["preset"]),
        },
        {
            "measure": f"tune: best trial of the family ({a['trials']} vs {b['trials']} "
            "trials), val accuracy",
            "pretrained (DINO)": _fmt(a["best"]),
            "scratch (random init)": _fmt(b["best"]),
        },
    ]
    for row, (x, y) in zip(
        rows,
        [
            (pretrain.get("probe_knn_acc"), pretrain.get("probe_knn_acc_random")),
            (pretrain.get("probe_linear_acc"), pretrain.get("probe_linear_acc_random")),
            (a["preset"], b["preset"]),
            (a["best"], b["best"]),
        ],
        strict=True,
    ):
        row["gain"] = gain(x, y)
    family = champion.get("family")
    side = "pretrained (DINO)" if family == ssl else "scratch (random init)"
    other = "scratch (random init)" if family == ssl else "pretrained (DINO)"
    rows.append(
        {
            "measure": f"champion ({family}, fine-tuned {champion['epochs']} epochs): test "
            f"accuracy ({champion['test_images']} images; + flip TTA)",
            side: f"{_fmt(champion['test'])} ({_fmt(champion['test_tta'])})",
            other: "not picked",
            "gain": "",
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    from pipelines.config import load_params

    no_readme = "--no-readme" in (sys.argv[1:] if argv is None else argv)
    params = load_params(PROFILE).tune
    inits = {name: f.init for name, f in params.families.items()}
    ssl = next(n for n, i in inits.items() if i == "ssl")
    scratch = next(n for n, i in inits.items() if i == "scratch")
    pretrain = _json(REPORTS / "pretrain" / "metrics.json")
    fams = family_rows(read_trials(REPORTS / "tune" / "trials.csv"), inits, params.points("cls"))
    finetune = _json(REPORTS / "finetune" / "metrics.json")
    evaluate = _json(REPORTS / "evaluate" / "metrics.json")
    best = _json(Path("models/tune/best.json"))
    picked = best["per_budget"][best["selected_budget"]]
    trials = {t["trial"]: t for t in read_trials(REPORTS / "tune" / "trials.csv")}
    confusion = _json(REPORTS / "evaluate" / "details.json")["results"]["test/plain"]["confusion"]
    champion = {
        "family": trials.get(picked["trial"], {}).get("family"),
        "summary": picked["summary"],
        "epochs": finetune["epochs"],
        "test": evaluate.get("test.plain", {}).get("accuracy"),
        "test_tta": evaluate.get("test.plain_tta", {}).get("accuracy"),
        "test_images": int(sum(map(sum, confusion))),
    }
    rows = table_rows(pretrain, fams, ssl, scratch, champion)
    columns = ["measure", "pretrained (DINO)", "scratch (random init)", "gain"]
    meta = {
        "command": f"{COMMAND} && python benchmarks/fashion_mnist_results.py",
        "families": fams,
        "champion": champion,
        "pretrain": {k: v for k, v in pretrain.items() if not k.startswith("probe_num")},
        "finetune": finetune,
    }
    _, md_path = write_results("fashion_mnist", rows, columns, meta)
    print(md_path.read_text())
    if not no_readme:
        fill_readme("fashion-mnist", markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
