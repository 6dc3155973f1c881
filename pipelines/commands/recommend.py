"""``gattn recommend --task seg --memory 12``: which global-context strategy fits a budget.

Answers from the ``tune`` stage's measurements (``reports/tune/pareto.json``: the configs no
other beats on quality, peak memory and speed at once; the task from
``models/tune/best.json``): the best-quality config whose measured training peak fits. Falls
back to the documented default table (:data:`gattn.budget.recommend.DEFAULT_TABLE`, the source
article's rule of thumb) when there are no measurements for the task or none fits. Prints what
it chose and why, with the figures (``--json`` for a machine-readable answer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from gattn.budget.recommend import Recommendation, recommend
from pipelines.contracts import BEST_FIX, BestFile, read_file
from pipelines.paths import BEST_JSON, PARETO_JSON


def load_measured(pareto: Path, best: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The measured Pareto points and their task (``([], None)`` when there are none).

    Raises:
        ValueError: a file exists but is not the tune stage's format.
    """
    if not Path(pareto).is_file():
        return [], None
    try:
        data = json.loads(Path(pareto).read_text())
        points, task = list(data["points"]), data.get("task")
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{pareto}: not a tune Pareto file ({err}); rerun `gattn tune`") from None
    if task is None and Path(best).is_file():
        task = read_file(BestFile, best, BEST_FIX).task
    return points, task


def answer(
    task: str, memory_gib: float, pareto: Path = PARETO_JSON, best: Path = BEST_JSON
) -> Recommendation:
    """The recommendation for ``task`` under ``memory_gib`` from the files (or the table)."""
    points, measured_task = load_measured(pareto, best)
    return recommend(task, memory_gib, points, measured_task)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=("seg", "cls"), required=True, help="task kind")
    parser.add_argument(
        "--memory", type=float, required=True, help="training memory available, GiB"
    )
    parser.add_argument("--pareto", type=Path, default=PARETO_JSON, help="tune stage Pareto file")
    parser.add_argument("--best", type=Path, default=BEST_JSON, help="tune stage best.json")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def run(args: argparse.Namespace) -> int:
    from pipelines.config import ParamsError

    try:
        rec = answer(args.task, args.memory, args.pareto, args.best)
    except ValueError as err:
        raise ParamsError(str(err)) from None
    if args.json:
        print(json.dumps(rec.__dict__, indent=2, default=str))
    else:
        print(rec.describe())
    return 0
