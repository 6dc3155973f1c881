"""Shared plumbing for benchmark scripts: timing, environment, JSON + markdown output.

Every benchmark compares against a baseline measured in the same process, so the ratios hold
across machines even when the absolute numbers do not.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(
    fn: Callable[[], object], device: torch.device, warmup: int = 1, reps: int = 3
) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(device: torch.device) -> dict[str, Any]:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str],
    meta: dict[str, Any],
    notes: str = "",
    out_dir: Path = RESULTS,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (meta + rows) and ``<name>.md`` (a table) atomically."""
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    _atomic_write(json_path, json.dumps({"meta": meta, "rows": list(rows)}, indent=2) + "\n")
    header = f"# {name}\n\n" + "".join(f"- {k}: {v}\n" for k, v in meta.items()) + "\n"
    _atomic_write(md_path, header + markdown_table(rows, columns) + ("\n" + notes if notes else ""))
    return json_path, md_path


def fill_readme(marker: str, table: str, readme: Path = README) -> None:
    """Replace the text between ``<!-- marker -->`` and ``<!-- /marker -->`` in the README.

    The README's result tables are written by the scripts that measure them, never by hand.
    """
    text = readme.read_text()
    start, end = f"<!-- {marker} -->\n", f"<!-- /{marker} -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme}: no '{start.strip()}' ... '{end}' block to fill")
    head, rest = text.split(start, 1)
    _atomic_write(readme, head + start + table + rest[rest.index(end) :])
