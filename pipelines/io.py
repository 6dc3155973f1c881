"""Atomic file output shared by every stage: a killed stage never leaves a half-written file
or folder that looks complete (DVC and the next stage would take it for a finished one)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str]) -> None:
    """Atomically write dict rows as CSV with the given columns."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def staging_dir(out_dir: Path) -> Path:
    """An empty ``.<name>.partial`` folder beside ``out_dir`` to build the output in."""
    work = Path(out_dir).with_name(f".{Path(out_dir).name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def publish_dir(work: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` with the finished staging folder ``work`` (see :func:`staging_dir`)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, out_dir)
