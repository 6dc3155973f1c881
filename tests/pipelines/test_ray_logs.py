"""A stage's output on a local Ray is its own progress, not Ray's benign warnings.

Before :mod:`pipelines.ray_logs`, each Ray Train run printed Ray's placement-group cleaner's
"State API may be temporarily unavailable" about once a second (159 of the 307 lines of a
``make run``). A real Ray Train run in a fresh process shows they are gone while the run's own
output and Ray's errors still come through.
"""

from __future__ import annotations

import logging
import logging.config
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.ray_logs import BENIGN_WARNINGS, ErrorsOnly, logger_name, quiet_benign_warnings

ROOT = Path(__file__).resolve().parents[2]

# Three epochs of about two seconds on one Ray Train worker, through the stages' own
# local_ray + fit_torch_trainer; the loop prints a line per epoch.
SCRIPT = """
import sys, tempfile, time
from pathlib import Path
from types import SimpleNamespace

from pipelines.train.trainer import checkpoint_dir, fit_torch_trainer


def loop(config):
    import ray.train

    for epoch in range(3):
        time.sleep(2.0)
        with checkpoint_dir(config, epoch) as d:
            (d / "epoch.txt").write_text(str(epoch))
            checkpoint = ray.train.Checkpoint.from_directory(str(d))
            ray.train.report({"epoch": epoch}, checkpoint=checkpoint)
        print(f"progress: epoch {epoch + 1} done", flush=True)


p = SimpleNamespace(num_workers=1, cpus_per_worker=1, use_gpu=False, max_failures=0)
result, wall = fit_torch_trainer(loop, {}, p, "quiet", Path(sys.argv[1]))
print(f"progress: trained in {wall:.1f} s", flush=True)
"""


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_benign_warnings_are_silenced_even_after_ray_train_configures_logging() -> None:
    quiet_benign_warnings()
    quiet_benign_warnings()  # idempotent: one filter per logger
    # What Ray Train's LoggingManager does when a controller or worker starts: dictConfig of
    # "ray.train", which resets the level of every existing ray.train.* logger to NOTSET.
    collect = _Collect()
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "loggers": {"ray.train": {"level": "DEBUG", "propagate": False}},
        }
    )
    for name in ("ray.train", "ray", ""):
        logging.getLogger(name).addHandler(collect)
    try:
        for name in BENIGN_WARNINGS:
            logger = logging.getLogger(logger_name(name))
            assert sum(isinstance(f, ErrorsOnly) for f in logger.filters) == 1
            logger.warning("benign %s", name)
            logger.error("real %s", name)  # real errors still show
        logging.getLogger("ray.train.v2.other").warning("other warning")
    finally:
        for name in ("ray.train", "ray", ""):
            logging.getLogger(name).removeHandler(collect)
        logging.getLogger("ray.train").propagate = True
    assert not [m for m in collect.messages if m.startswith("benign")]
    assert {m for m in collect.messages if m.startswith("real")} == {
        f"real {name}" for name in BENIGN_WARNINGS
    }
    assert "other warning" in collect.messages


@pytest.mark.slow  # a local Ray and one Ray Train run: about a minute on 2 cores
def test_a_ray_train_run_prints_its_progress_without_ray_noise(tmp_path: Path) -> None:
    pytest.importorskip("ray.train")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "storage")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "progress: epoch 3 done" in text and "progress: trained in" in text
    for epoch in (1, 2, 3):  # once each (Ray Train's print patch printed them twice)
        assert text.count(f"progress: epoch {epoch} done") == 1, text[-3000:]
    for noise in (
        "State API may be temporarily unavailable",
        "Failed to send resource request",
        "Found multiple active Ray instances",
        "PlacementGroupCleaner",
        "PreemptionWatcher",
        "Checkpoint successfully created",
        "Reporting training result",
    ):
        assert noise not in text, text[-3000:]
