"""``gattn --help`` and the ``gattn predict`` HTTP client start without the heavy libraries.

Behavioural, not timed: a fresh interpreter runs the command line as the entry script does and
reports which of torch, torchvision, timm, Ray and MLflow ended up in ``sys.modules``. Importing
any of them costs seconds (torch alone 3-5 s on the shared machines), which is what made
``gattn --help`` take 5-15 s and ``gattn predict`` 14 s.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "timm", "ray", "mlflow")

# Runs ``pipelines.cli.main(argv)`` like the ``gattn`` entry script, then prints the exit
# status and the heavy top-level packages that were imported, as JSON on the last line.
PROBE = """
import json, sys
from pipelines.cli import main
argv, heavy = json.loads(sys.argv[1]), json.loads(sys.argv[2])
try:
    rc = main(argv)
except SystemExit as exit_:
    rc = exit_.code
print(json.dumps({"rc": rc, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def _imports_of(argv: Sequence[str], cwd: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(argv)), json.dumps(HEAVY)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_imports_nothing_heavy() -> None:
    result = _imports_of(["--help"], ROOT)
    assert result == {"rc": 0, "loaded": []}


def test_predict_client_imports_nothing_heavy(tmp_path: Path, free_port: Callable[[], int]) -> None:
    # The whole client path (params.yaml read, image read, request sent): nothing listens on
    # the port, so the request fails fast with the client's own error (exit 1).
    image = tmp_path / "image.png"
    image.write_bytes(b"not really a png")
    url = f"http://127.0.0.1:{free_port()}"
    result = _imports_of(["predict", str(image), "--url", url, "--timeout", "5"], ROOT)
    assert result == {"rc": 1, "loaded": []}


@pytest.mark.parametrize("module", ["pipelines.cli", "pipelines.serve.client"])
def test_client_modules_import_nothing_heavy(module: str) -> None:
    code = (
        f"import json, sys, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout) == []
