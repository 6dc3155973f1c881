"""The outputs of the ``tune`` stage, from the trials' rows.

- ``models/tune/best.json`` (:class:`pipelines.contracts.BestFile`): the best config per
  budget (by quality, among trained configs whose *measured* peak fits) and the selected
  budget, read by the finetune stage; beside it ``weights/<trial>.safetensors``, each best
  trial's weights after its last reported epoch (the entry's ``weights``; ``finetune.init:
  trial`` starts from them);
- ``reports/tune/``: ``trials.csv`` (every trial), ``pareto.csv``/``pareto.json`` (the configs
  no other beats on quality, memory and speed at once; ``gattn recommend`` reads it),
  ``pareto.png`` and ``metrics.json``;
- one MLflow child run per trial (:func:`log_trials`), logged from the driver after the
  sweep, so a crashed trial is logged too.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gattn.budget.recommend import best_fitting
from pipelines.config import Task, TuneParams
from pipelines.contracts import BestFile
from pipelines.io import publish_dir, staging_dir, write_csv, write_json
from pipelines.metrics import METRIC
from pipelines.paths import BEST_JSON
from pipelines.stages.tune.space import summary, trial_id
from pipelines.stages.tune.trial import WEIGHTS

WEIGHTS_DIR = "weights"  # in best.json's folder: ``<trial>.safetensors`` per best entry

TRIAL_COLUMNS = [
    "trial",
    "status",
    "family",
    "module",
    "module_size",
    "attn_impl",
    "position",
    "num_blocks",
    "head",
    "batch_size",
    "img_size",
    "lr",
    "estimated_memory_gib",
    "peak_memory_gib",
    "fits_budgets_gib",
    "quality",
    "metric",
    "epochs",
    "steps",
    "images_per_s",
    "params",
    "pretrained_tensors",
    "train_s",
    "skipped",
    "error",
]
PARETO_COLUMNS = [
    "trial",
    "quality",
    "metric",
    "peak_memory_gib",
    "images_per_s",
    "params",
    "summary",
]


def pareto_front(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows no other row beats on quality (max), peak memory (min) and images/s (max) at
    once, sorted by memory."""

    def dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        ge = (
            a["quality"] >= b["quality"]
            and a["peak_memory_gib"] <= b["peak_memory_gib"]
            and a["images_per_s"] >= b["images_per_s"]
        )
        gt = (
            a["quality"] > b["quality"]
            or a["peak_memory_gib"] < b["peak_memory_gib"]
            or a["images_per_s"] > b["images_per_s"]
        )
        return ge and gt

    front = [r for r in rows if not any(dominates(o, r) for o in rows if o is not r)]
    return sorted(front, key=lambda r: (r["peak_memory_gib"], -r["quality"]))


def point(row: Mapping[str, Any]) -> dict[str, Any]:
    """A trained trial as a Pareto/best entry (the ``best.json`` contract)."""
    sample = row["config"]
    return {
        "trial": row["trial"],
        "summary": row["summary"],
        "model": row["model"],
        "train": {
            "lr": float(sample["lr"]),
            "batch_size": int(sample["batch_size"]),
            "img_size": int(sample["img_size"]),
            "weight_decay": row["weight_decay"],
            "epochs": int(row["epochs"]),
        },
        "quality": float(row["quality"]),
        "metric": row["metric"],
        "peak_memory_gib": float(row["peak_memory_gib"]),
        "estimated_memory_gib": float(row["estimated_memory_gib"]),
        "images_per_s": float(row["images_per_s"]),
        "params": int(row["params"]),
    }


def best_per_budget(
    points: Sequence[Mapping[str, Any]], budgets: Sequence[float]
) -> dict[str, Mapping[str, Any] | None]:
    """The best-quality trained config whose measured peak fits each budget (None if none)."""
    return {_key(b): best_fitting(points, b) for b in sorted(budgets)}


def _key(budget: float) -> str:
    return f"{budget:g}"


def pareto_figure(
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    budgets: Sequence[float],
    path: Path,
) -> None:
    """Quality vs peak memory (log scale), colour = images/s; the front joined; infeasible
    configs at their estimate on the x axis; budgets as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from gattn.diagnostics import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        sc = ax.scatter(
            [r["peak_memory_gib"] for r in ok],
            [r["quality"] for r in ok],
            c=[r["images_per_s"] for r in ok],
            cmap="viridis",
            s=40,
            label="trained",
        )
        fig.colorbar(sc, ax=ax, label="training images/s")
    if front:
        ax.plot(
            [r["peak_memory_gib"] for r in front],
            [r["quality"] for r in front],
            "o--",
            mfc="none",
            color="tab:red",
            ms=11,
            label="Pareto front",
        )
    skipped = [r for r in rows if r["status"] == "infeasible"]
    if skipped:
        ax.scatter(
            [r["estimated_memory_gib"] for r in skipped],
            [0.0] * len(skipped),
            marker="x",
            color="grey",
            label="infeasible (estimate)",
        )
    for b in budgets:
        ax.axvline(b, color="black", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(sorted(budgets))  # the budgets (dotted lines) are the ticks
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    metric = rows[0]["metric"] if rows else "quality"
    ax.set(xlabel="peak training memory (GiB; dotted: budgets)", ylabel=f"validation {metric}")
    ax.set_title("tune: quality vs memory vs speed")
    ax.legend(loc="best", fontsize=8)
    save_figure(fig, path)


def trial_row(result: Any) -> dict[str, Any]:
    """A trial row from a Tune ``Result`` (its last report, or its error); ``checkpoint`` is the
    folder of its latest checkpoint (the weights of its last reported epoch), or None."""
    metrics = dict(result.metrics or {})
    sample = dict(result.config or {})
    row = {
        k: v
        for k, v in metrics.items()
        if k in (*TRIAL_COLUMNS, "summary", "model", "traceback", "loss")
    }
    for key in ("model", "fits_budgets_gib"):
        if isinstance(row.get(key), str):
            row[key] = json.loads(row[key])
    row["config"] = sample
    row["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    row.setdefault("trial", trial_id(sample))
    row.setdefault("summary", summary(sample) if sample else "")
    if result.error is not None and row.get("status") in (None, "ok"):
        row["status"], row["error"] = "error", f"trial process failed: {result.error}"[:2000]
    row.setdefault("status", "stopped")  # never reported: ended by tune.time_budget_s
    history = getattr(result, "metrics_dataframe", None)
    row["history"] = (
        [
            {"epoch": int(e), "quality": float(q)}
            for e, q in zip(history["epochs"], history["quality"], strict=True)
            if e
        ]
        if history is not None and "epochs" in history and "quality" in history
        else []
    )
    return row


def _flat(row: Mapping[str, Any]) -> dict[str, Any]:
    sample = row["config"]
    out = {k: sample.get(k, "") for k in TRIAL_COLUMNS if k in sample}
    out.update({k: row.get(k, "") for k in TRIAL_COLUMNS if k not in out})
    out["fits_budgets_gib"] = " ".join(f"{b:g}" for b in row.get("fits_budgets_gib") or [])
    return out


def write_outputs(
    rows: Sequence[dict[str, Any]],
    p: TuneParams,
    kind: Task,
    wall: float,
    out_dir: Path,
    reports_dir: Path,
    measured_on: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``best.json`` with the best trials' weights (atomically, as a folder; see
    :func:`copy_weights`) and the reports; return the metrics.

    ``measured_on`` (``split``, ``images``, ``size``, ``metric``) says which images every
    trial's ``quality`` was scored on, so that the finetune stage can score its model on the
    same ones (:func:`pipelines.metrics.score_resized`)."""
    budgets = sorted(p.budgets_gib)
    for row in rows:  # a trial that never reported (stopped, process lost) has no figures
        row["weight_decay"] = p.weight_decay
        row.setdefault("metric", METRIC[kind])
        row.setdefault("quality", 0.0)
    trained = [point(r) for r in rows if r["status"] == "ok"]
    front = pareto_front(trained)
    per_budget = best_per_budget(trained, budgets)
    work = staging_dir(out_dir)
    per_budget = copy_weights(per_budget, rows, work)
    best = best_file(per_budget, budgets, p.select_budget, kind, measured_on)
    write_json(work / BEST_JSON.name, best.model_dump(mode="json", exclude_unset=True))
    write_reports(rows, front, budgets, kind, reports_dir)
    metrics = sweep_metrics(rows, trained, front, per_budget, budgets, wall)
    write_json(reports_dir / "metrics.json", metrics)
    publish_dir(work, out_dir)
    return metrics


def copy_weights(
    per_budget: Mapping[str, Mapping[str, Any] | None],
    rows: Sequence[Mapping[str, Any]],
    work: Path,
) -> dict[str, Mapping[str, Any] | None]:
    """Copy each best entry's checkpointed weights to ``work/weights/<trial>.safetensors``;
    returns the entries with ``weights`` (the path relative to ``work``) where the trial's
    row has a checkpoint (a trial whose reports carried none keeps no ``weights``)."""
    sources = {
        r["trial"]: Path(r["checkpoint"]) / WEIGHTS
        for r in rows
        if r.get("checkpoint") and (Path(r["checkpoint"]) / WEIGHTS).is_file()
    }
    out: dict[str, Mapping[str, Any] | None] = {}
    for key, entry in per_budget.items():
        source = sources.get(entry["trial"]) if entry is not None else None
        if entry is None or source is None:
            out[key] = entry
            continue
        relative = f"{WEIGHTS_DIR}/{entry['trial']}.safetensors"
        (work / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, work / relative)
        out[key] = {**entry, "weights": relative}
    return out


def best_file(
    per_budget: Mapping[str, Mapping[str, Any] | None],
    budgets: list[float],
    select_budget: float | None,
    kind: Task,
    measured_on: Mapping[str, Any] | None,
) -> BestFile:
    """``best.json``: the best config per budget and the budget the finetune stage trains
    (``select_budget``, else the largest budget with a config, else the largest)."""
    chosen = [b for b in budgets if per_budget[_key(b)] is not None]
    selected = (
        select_budget if select_budget is not None else (chosen[-1] if chosen else budgets[-1])
    )
    return BestFile.model_validate(
        {
            "task": kind,
            "measured_on": dict(measured_on or {}),
            "budgets_gib": budgets,
            "per_budget": per_budget,
            "selected_budget": _key(selected),
        }
    )


def write_reports(
    rows: Sequence[dict[str, Any]],
    front: list[Mapping[str, Any]],
    budgets: list[float],
    kind: Task,
    reports_dir: Path,
) -> None:
    """``trials.csv``, the Pareto front as ``pareto.csv``/``pareto.json``, and ``pareto.png``."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    write_csv(reports_dir / "trials.csv", [_flat(r) for r in rows], TRIAL_COLUMNS)
    write_csv(
        reports_dir / "pareto.csv",
        [{k: f[k] for k in PARETO_COLUMNS} for f in front],
        PARETO_COLUMNS,
    )
    write_json(
        reports_dir / "pareto.json",
        {
            "task": kind,
            "metric": METRIC[kind],
            "budgets_gib": budgets,
            "objectives": {"quality": "max", "peak_memory_gib": "min", "images_per_s": "max"},
            "points": front,
        },
    )
    pareto_figure(rows, front, budgets, reports_dir / "pareto.png")


def sweep_metrics(
    rows: Sequence[Mapping[str, Any]],
    trained: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    per_budget: Mapping[str, Mapping[str, Any] | None],
    budgets: list[float],
    wall: float,
) -> dict[str, Any]:
    """The stage's ``metrics.json``: trial counts by status, the best quality overall and per
    budget, and how far the memory estimate was from the measured peak."""
    counts = {
        s: sum(r["status"] == s for r in rows)
        for s in ("ok", "infeasible", "error", "oom", "stopped")
    }
    errors = [
        abs(t["estimated_memory_gib"] - t["peak_memory_gib"]) / t["peak_memory_gib"]
        for t in trained
        if t["peak_memory_gib"] > 0
    ]
    return {
        "num_trials": len(rows),
        **{f"num_{k}": v for k, v in counts.items()},
        "num_pareto": len(front),
        "best_quality": max((t["quality"] for t in trained), default=0.0),
        **{
            f"best_quality_{_key(b)}gib": (per_budget[_key(b)] or {}).get("quality", 0.0)
            for b in budgets
        },
        "estimate_max_rel_error": max(errors, default=0.0),
        "wall_s": wall,
    }


def log_trials(rows: Sequence[Mapping[str, Any]], experiment_id: str, parent_id: str) -> None:
    """One MLflow child run per trial under ``parent_id``: sample, status, figures, curve."""
    import mlflow

    for row in rows:
        tags = {
            "mlflow.parentRunId": parent_id,
            "gattn.stage": "tune.trial",
            "gattn.status": row["status"],
        }
        with mlflow.start_run(
            experiment_id=experiment_id, run_name=f"trial-{row['trial']}", nested=True, tags=tags
        ):
            mlflow.log_params({k: str(v)[:500] for k, v in row["config"].items()})
            mlflow.log_param("summary", row.get("summary", "")[:500])
            figures = {
                k: float(row[k])
                for k in (
                    "quality",
                    "estimated_memory_gib",
                    "peak_memory_gib",
                    "images_per_s",
                    "params",
                    "steps",
                    "train_s",
                )
                if isinstance(row.get(k), int | float)
            }
            mlflow.log_metrics(figures)
            for h in row.get("history", []):
                mlflow.log_metric("epoch_quality", h["quality"], step=h["epoch"])
            if row.get("error"):
                mlflow.set_tag("gattn.error", row["error"][:5000])
