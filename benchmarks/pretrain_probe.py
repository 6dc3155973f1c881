"""Does self-supervised pretraining beat random initialisation on the generated benchmark?

Usage: ``python benchmarks/pretrain_probe.py [--tasks cue-seg pathfinder --seeds 0 1]``

Runs the real ``pretrain`` stage (:func:`pipelines.stages.pretrain.pretrain`, on Ray) for each task,
recipe and seed, and reads its frozen-feature probes (:mod:`gattn.ssl.probe`: weighted k-NN and
a linear probe on pooled encoder features, scored on the val split, each against the same
encoder at its random initialisation: the same seed and constructor call as the run's start).
This is the evidence for issue 4 §3. The recipes are the stage's default (MAE, 3 epochs), a
longer MAE with ``norm_pix_loss`` and DINO. Every size is a flag, so the same study runs larger
where there is time. Writes ``benchmarks/results/<--out>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, write_results  # noqa: E402

from pipelines.config import Params, PretrainParams  # noqa: E402
from pipelines.ray_session import local_ray  # noqa: E402
from pipelines.stages.pretrain import pretrain  # noqa: E402

COLUMNS = [
    "task",
    "recipe",
    "seed",
    "first_loss",
    "loss",
    "knn_pretrained",
    "knn_random",
    "linear_pretrained",
    "linear_random",
    "knn_gain",
    "linear_gain",
    "wall_s",
]


def recipes(long_epochs: int, dino_epochs: int) -> dict[str, dict[str, Any]]:
    """Name -> ``pretrain`` section overrides."""
    return {
        "mae (stage default)": {},
        f"mae {long_epochs} ep, norm_pix": {
            "epochs": long_epochs,
            "mae": {"norm_pix_loss": True},
        },
        f"dino {dino_epochs} ep": {"method": "dino", "epochs": dino_epochs},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["cue-seg", "pathfinder"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--num-samples", type=int, default=800, help="generated images per task")
    parser.add_argument("--long-epochs", type=int, default=30, help="epochs of the long MAE")
    parser.add_argument("--dino-epochs", type=int, default=10)
    parser.add_argument("--out", default="pretrain_probe", help="results name")
    args = parser.parse_args()

    from pipelines.stages.prepare import prepare

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, local_ray():
        root = Path(tmp)
        for task in args.tasks:
            prepared = root / task / "prepared"
            data = {"task": task, "num_samples": args.num_samples, "large": {"num_samples": 0}}
            prepare(Params.model_validate({"data": data}), prepared, root / task / "reports")
            for name, overrides in recipes(args.long_epochs, args.dino_epochs).items():
                for seed in args.seeds:
                    p = PretrainParams.model_validate(
                        {**overrides, "storage": str(root / "ray"), "log_every_n_steps": 1000}
                    )
                    out = root / task / f"{name}-{seed}".replace(" ", "_").replace(",", "")
                    m = pretrain(p, seed, prepared, out / "model", out / "reports")["metrics"]
                    row = {
                        "task": task,
                        "recipe": name,
                        "seed": seed,
                        "first_loss": m["first_epoch_loss"],
                        "loss": m["loss"],
                        "knn_pretrained": m["probe_knn_acc"],
                        "knn_random": m["probe_knn_acc_random"],
                        "linear_pretrained": m["probe_linear_acc"],
                        "linear_random": m["probe_linear_acc_random"],
                        "knn_gain": m["probe_knn_gain"],
                        "linear_gain": m["probe_linear_gain"],
                        "wall_s": m["wall_s"],
                    }
                    rows.append(row)
                    print(row, flush=True)

    ahead = sorted(
        {
            (r["task"], r["recipe"])
            for r in rows
            if all(
                o["knn_gain"] > 0 and o["linear_gain"] >= 0
                for o in rows
                if (o["task"], o["recipe"]) == (r["task"], r["recipe"])
            )
        }
    )
    meta = {
        **environment(torch.device("cpu")),
        "num_samples": args.num_samples,
        "probe": "pooled features; k-NN (k=20, T=0.07) and L2 logistic regression, val split",
        "command": " ".join(sys.argv),
    }
    notes = (
        "Question (issue 4 §3): does the pretrained encoder beat its random initialisation "
        "under frozen-feature probes? Recipes with a k-NN gain on every seed and no linear "
        f"loss: {ahead or 'none'}.\n"
    )
    json_path, md_path = write_results(args.out, rows, COLUMNS, meta, notes)
    print(notes + f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
