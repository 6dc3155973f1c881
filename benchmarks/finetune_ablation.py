"""Why the champion differs from the search's trial: the searched config trained both ways,
then with one difference between them switched at a time.

Usage: ``python benchmarks/finetune_ablation.py [--seeds 0 1] [--variants ...] [--best PATH]``

The config is the search's fixed point "local CNN + global self-attention x2" (the global
point of ``tune.points_to_evaluate`` in params.yaml), or ``--best``'s selected entry. On the
prepared default data (``data/prepared``; run ``gattn prepare`` first) it is trained

- ``tune trial``: as a tune trial trains it
  (:func:`pipelines.stages.tune.trial.train_config`, in-process, ``tune`` section of
  params.yaml);
- ``finetune``: as the finetune stage trains it
  (:func:`pipelines.stages.finetune.finetune`, Ray Train, ``finetune`` section);
- and as the finetune stage with one setting switched: the context-crop share, the
  learning-rate schedule (constant vs warm-up + cosine), the initial weights (scratch vs
  ``ssl``, the pretrain stage's encoder), epochs, class weighting, the validation subset that
  picks the best epoch, and a Ray Train worker vs Ray Train's local mode (the same loop in
  this process, which the other variants use).

Every model is scored the same way: val and test mIoU at the training size
(:func:`pipelines.metrics.score`), and on the large 256 px test images with sliding windows,
without and with global-context feedback (the evaluate stage's runners). Each (variant, seed)
is one resumable piece: its result is cached under ``--work`` and a rerun skips it. Writes
``benchmarks/results/<--out>.{json,md}`` with the mean and spread (max - min) over seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    _atomic_write,
    environment,
    fill_readme,
    markdown_table,
    write_results,
)

from gattn.data.views import seg_eval_transform  # noqa: E402
from gattn.models import build_model, load_model  # noqa: E402
from gattn.models.pretrained import read_encoder, same_backbone  # noqa: E402
from pipelines.config import EvaluateParams, load_params  # noqa: E402
from pipelines.data import open_split  # noqa: E402
from pipelines.metrics import score  # noqa: E402
from pipelines.stages.evaluate import runners, score_mode  # noqa: E402
from pipelines.stages.finetune import finetune  # noqa: E402
from pipelines.stages.tune.space import model_config, summary, trial_id  # noqa: E402
from pipelines.stages.tune.stage import data_context  # noqa: E402
from pipelines.stages.tune.trial import train_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# The finetune recipe the issue reported (the champion far below its trial): the variants
# switch one setting of it at a time. "params.yaml" is the recipe the stage has now.
BEFORE = {"context_crop": 0.5, "epochs": 10}
# name -> overrides of the finetune section on top of BEFORE (None: the tune trial)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "finetune (before)": {},
    "tune trial": None,
    "params.yaml (now)": None,
    "context_crop=0": {"context_crop": 0.0},
    "context_crop=0.25": {"context_crop": 0.25},
    "epochs=20": {"epochs": 20},
    "constant lr": {"warmup_epochs": 0.0, "min_lr_ratio": 1.0},
    "epochs=4": {"epochs": 4},
    "balance_classes=false": {"balance_classes": False},
    "max_val_samples=64": {"max_val_samples": 64},
    "Ray Train worker": {"num_workers": 1},
    "init=scratch": {"init": "scratch"},
    "init=ssl": {"init": "ssl"},
}


def finetune_section(name: str, params: Any) -> Any | None:
    """The effective finetune section of a variant (None for the tune trial)."""
    if name == "params.yaml (now)":
        return params.finetune
    if VARIANTS[name] is None:
        return None
    return params.finetune.model_copy(update={**BEFORE, **VARIANTS[name]})


COLUMNS = [
    "variant",
    "settings",
    "val_miou",
    "val_spread",
    "test_miou",
    "test_spread",
    "large_sliding",
    "large_sliding_global",
    "feedback_gain",
    "seeds",
    "per_seed_test",
    "train_s",
]


def searched_entry(params: Any, best: Path | None, num_classes: int) -> dict[str, Any]:
    """A ``best.json`` entry: ``--best``'s selected one, or the global-attention fixed point."""
    if best is not None:
        data = json.loads(best.read_text())
        return data["per_budget"][data["selected_budget"]]
    p = params.tune
    sample = next(x for x in p.points_to_evaluate if x.get("module") == "global_attn")
    cfg = model_config(sample, p, "seg", num_classes, 3)
    return {
        "trial": trial_id(sample),
        "summary": summary(sample),
        "model": cfg,
        "sample": sample,
        "train": {
            "lr": float(sample["lr"]),
            "batch_size": int(sample["batch_size"]),
            "img_size": int(sample["img_size"]),
        },
        "quality": 0.0,
        "metric": "miou",
    }


def train_trial(params: Any, entry: dict[str, Any], seed: int, prepared: Path) -> Any:
    """The config trained as a tune trial trains it; returns the model."""
    p = params.tune
    context = data_context(prepared, ROOT / "models/pretrained", p, seed)
    # The family whose initial weights (tune.families.<name>.init) the trial starts from.
    family = next(
        (k for k, f in p.families.items() if f.backbone == entry["model"]["backbone"]), ""
    )
    sample = entry.get("sample") or {**entry["train"], "family": family, "module": ""}
    row: dict[str, Any] = {"steps": 0}
    torch.set_num_threads(2)
    return train_config(
        sample, context, p, dict(entry["model"]), torch.device("cpu"), row, lambda r: None
    )


def train_finetune(
    section: Any, entry: dict[str, Any], seed: int, prepared: Path, work: Path
) -> Any:
    """The config trained by the finetune stage with ``section``; returns the model."""
    best = {"task": "seg", "per_budget": {"1": entry}, "selected_budget": "1", "budgets_gib": [1]}
    (work / "best.json").write_text(json.dumps(best))
    p = section.model_copy(
        update={"storage": str(work / "ray"), "max_failures": 0, "search_tolerance": None}
    )
    p = type(p).model_validate(p.model_dump())
    finetune(
        p,
        seed,
        work / "best.json",
        ROOT / "models/pretrained",
        prepared,
        work / "model",
        work / "reports",
    )
    model, _ = load_model(work / "model")
    return model


@torch.no_grad()
def scores(model: Any, prepared: Path, size: int, num_classes: int) -> dict[str, float]:
    """val/test mIoU at ``size`` and large-image sliding mIoU without/with feedback."""
    model.eval()
    out = {}
    for split in ("val", "test"):
        ds = open_split(split, prepared, seg_eval_transform(size))
        loader = torch.utils.data.DataLoader(ds, batch_size=32)
        out[f"{split}_miou"] = score(model, loader, "seg", num_classes)["miou"]
    large = open_split("test", prepared, seg_eval_transform(None), large=True)
    p = EvaluateParams()
    for mode, run in runners(model, "seg", size, p, True).items():
        if mode.startswith("sliding"):
            out[f"large_{mode}"] = score_mode(run, large, "seg", num_classes, 4)["miou"]
    return out


def run_piece(
    name: str,
    seed: int,
    params: Any,
    entry: dict[str, Any],
    prepared: Path,
    work: Path,
    cached_only: bool = False,
) -> dict[str, Any] | None:
    """One (variant, seed): train, score, cache under a key of what it trains with (config,
    tune or effective finetune section, seed); a cached piece is read back. With
    ``cached_only`` a piece not yet run is None."""
    section = finetune_section(name, params)
    what = params.tune if section is None else section.model_copy(update={"storage": ""})
    key = json.dumps(
        {"entry": entry, "seed": seed, "trial": section is None, "p": what.model_dump(mode="json")},
        sort_keys=True,
    )
    piece = work / hashlib.sha256(key.encode()).hexdigest()[:12]
    done = piece / "result.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "variant": name}
    if cached_only:
        return None
    piece.mkdir(parents=True, exist_ok=True)
    num_classes = len(json.loads((prepared / "splits.json").read_text())["classes"])
    print(f"[ablation] {name}, seed {seed} ...", flush=True)
    t0 = time.perf_counter()
    if section is None:
        model = train_trial(params, entry, seed, prepared)
    else:
        model = train_finetune(section, entry, seed, prepared, piece)
    result = {
        "variant": name,
        "seed": seed,
        "train_s": time.perf_counter() - t0,
        **scores(model, prepared, int(entry["train"]["img_size"]), num_classes),
    }
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(done)
    print(f"[ablation] {name}, seed {seed}: {json.dumps(result)}", flush=True)
    return result


def settings(name: str, params: Any) -> str:
    """What the variant trains with (epochs, schedule, context crops, ...)."""
    f = finetune_section(name, params)
    if f is None:
        t = params.tune
        return (
            f"tune: {t.epochs} ep, warm-up {t.warmup_epochs} + cosine, no context crops, "
            f"in-process, best = last epoch"
        )
    sched = (
        "constant"
        if f.warmup_epochs == 0 and f.min_lr_ratio == 1
        else f"warm-up {f.warmup_epochs} + cosine"
    )
    where = "in-process" if f.num_workers == 0 else f"Ray Train x{f.num_workers}"
    return (
        f"finetune: {f.epochs} ep, {sched}, context_crop {f.context_crop}, init {f.init}, "
        f"balance {f.balance_classes}, val {f.max_val_samples or 'all'}, {where}"
    )


def readme_table(rows: list[dict[str, Any]]) -> str:
    """The README's ablation table (between its ``<!-- ablation -->`` markers)."""
    shown = [
        {
            "variant": r["variant"],
            "val mIoU": f"{r['val_miou']:.3f}",
            "test mIoU (spread)": f"{r['test_miou']:.3f} ({r['test_spread']:.3f})",
            "large: sliding → + feedback": (
                f"{r['large_sliding']:.2f} → {r['large_sliding_global']:.2f}"
            ),
            "seeds": r["seeds"],
        }
        for r in rows
    ]
    return markdown_table(shown, list(shown[0]) if shown else ["variant"])


def summarise(name: str, results: list[dict[str, Any]], params: Any) -> dict[str, Any]:
    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in results)

    def spread(key: str) -> float:
        return max(r[key] for r in results) - min(r[key] for r in results)

    return {
        "variant": name,
        "settings": settings(name, params),
        "val_miou": mean("val_miou"),
        "val_spread": spread("val_miou"),
        "test_miou": mean("test_miou"),
        "test_spread": spread("test_miou"),
        "large_sliding": mean("large_sliding"),
        "large_sliding_global": mean("large_sliding_global"),
        "feedback_gain": mean("large_sliding_global") - mean("large_sliding"),
        "seeds": " ".join(str(r["seed"]) for r in results),
        "per_seed_test": " / ".join(f"{r['test_miou']:.3f}" for r in results),
        "train_s": mean("train_s"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--data", type=Path, default=ROOT / "data/prepared")
    ap.add_argument("--best", type=Path, default=None, help="a best.json (default: fixed point)")
    ap.add_argument("--work", type=Path, default=ROOT / "outputs/finetune_ablation")
    ap.add_argument("--out", default="finetune_ablation")
    ap.add_argument("--no-readme", action="store_true", help="do not fill the README's table")
    ap.add_argument(
        "--cached-only", action="store_true", help="write the table from the pieces run so far"
    )
    args = ap.parse_args(argv)
    if not (args.data / "splits.json").is_file():
        ap.error(f"{args.data}: no prepared data; run `gattn prepare` first")

    params = load_params(args.params, [])
    num_classes = len(json.loads((args.data / "splits.json").read_text())["classes"])
    entry = searched_entry(params, args.best, num_classes)
    build_model(entry["model"])  # fail early on a config this code cannot build
    work = args.work
    rows, raw = [], []
    found = read_encoder(ROOT / "models/pretrained")
    fits = found is not None and same_backbone(found[0], entry["model"])
    # Ray Train's local mode: the same loop in this process, bit-identical to one Ray Train
    # worker (tests/pipelines/test_finetune.py), which the "Ray Train worker" variant runs.
    base = {"num_workers": 0}
    # The variants start as before (the fixed point's entry carries no trial weights): from the
    # pretrained encoder where it fits the backbone, else from scratch.
    base["init"] = "ssl" if fits else "scratch"
    params = params.model_copy(update={"finetune": params.finetune.model_copy(update=base)})
    for name in args.variants:
        if "init" in (VARIANTS[name] or {}) and not fits:
            print(f"[ablation] {name}: skipped, no pretrained encoder fits the config's backbone")
            continue
        if VARIANTS[name] and finetune_section(name, params) == finetune_section(
            "finetune (before)", params
        ):
            print(f"[ablation] {name}: skipped, the same as the recipe before")
            continue
        pieces = [
            run_piece(name, s, params, entry, args.data, work, args.cached_only) for s in args.seeds
        ]
        results = [r for r in pieces if r is not None]
        if not results:
            continue
        raw += results
        rows.append(summarise(name, results, params))
    meta = {
        **environment(torch.device("cpu")),
        "command": shlex.join(
            ["python", "benchmarks/finetune_ablation.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "config": entry.get("summary", entry["model"]),
        "seeds": args.seeds,
        "runs": f"benchmarks/results/{args.out}_runs.json (every variant and seed)",
    }
    note = (
        "mIoU over the 4 classes. val/test at the training size (64 px); large: the 256 px test "
        "images through 64 px sliding windows (overlap 16 px, gaussian blending), without and "
        "with global-context feedback. Spread = max - min over seeds."
    )
    write_results(args.out, rows, COLUMNS, meta, note)
    if not args.no_readme:
        fill_readme("ablation", readme_table(rows))
    _atomic_write(RESULTS / f"{args.out}_runs.json", json.dumps(raw, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
