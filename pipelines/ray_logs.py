"""Ray's warnings that mean nothing on the local Ray a stage starts, silenced where they are
logged, so a stage's terminal output is its own progress.

:func:`pipelines.ray_session.local_ray` starts one node on loopback without the dashboard, and
runs :func:`quiet_benign_warnings` in the driver and, by :func:`setup_worker` (Ray's
``worker_process_setup_hook``), in every worker process (controllers, helper actors, training
workers) before their code runs.
Only these loggers' notices and warnings go; their errors, and every other logger, still
show. They go by a filter on each logger, not by its level: Ray Train configures its
``ray.train`` logger with :func:`logging.config.dictConfig` when a controller or training
worker starts, which resets the level of every existing ``ray.train.*`` logger to ``NOTSET``
(the standard library's handling of child loggers) but keeps their filters. This module
imports nothing else, as each Ray worker process imports it at start.
"""

from __future__ import annotations

import logging

# logger -> why its warnings are noise on a local Ray.
BENIGN_WARNINGS: dict[str, str] = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": (
        "Ray Train's placement-group cleaner asks the State API every second whether the "
        "run's controller is alive; the State API needs the dashboard, which a local Ray runs "
        "without, so each run printed 'State API may be temporarily unavailable' once a "
        "second (and the local Ray, placement groups included, stops with the stage)"
    ),
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": (
        "Ray Train registers its workers with an autoscaling coordinator; a single node has "
        "no autoscaler, and on a busy machine the coordinator's 5 s reply timeout printed a "
        "traceback ('safe to ignore', says the message)"
    ),
    "ray.train._internal.storage": (
        "every tune trial checkpoints its weights each epoch (the weights finetune can start "
        "from), and each checkpoint logged a 'Checkpoint successfully created' line: 48 lines "
        "for the default sweep"
    ),
    "ray.train.v2._internal.execution.storage": (
        "the same 'Checkpoint successfully created' line from Ray Train's own runs (pretrain, "
        "finetune), once per epoch; the stage prints its own line per epoch"
    ),
    "ray.train.v2._internal.execution.context": (
        "'Reporting training result N: TrainingReport(...)', once per epoch of a Ray Train "
        "run, repeating the checkpoint path and metrics the stage prints itself"
    ),
    "ray._private.authentication.authentication_token_setup": (
        "the notice, once per stage, that token authentication is on by default (it stays on)"
    ),
}

# Modules of BENIGN_WARNINGS whose logger is named by the module's file path
# (``logging.getLogger(__file__)``), not by the module's name.
LOGGER_NAMED_BY_FILE = frozenset({"ray.train.v2._internal.execution.context"})

WORKER_SETUP_HOOK = f"{__name__}.setup_worker"  # for ray.init(runtime_env=...)


class ErrorsOnly(logging.Filter):
    """Drops the records below ``ERROR`` that are logged on the logger it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def logger_name(module: str) -> str:
    """The name of the logger ``module`` logs to: its own name, or for a module of
    :data:`LOGGER_NAMED_BY_FILE` its file's path (found without running the module; its
    parent packages are imported)."""
    if module not in LOGGER_NAMED_BY_FILE:
        return module
    import importlib.util

    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None and spec.origin else module


def quiet_benign_warnings() -> None:
    """Attach :class:`ErrorsOnly` to each logger of :data:`BENIGN_WARNINGS` in this process
    (once, however often it is called)."""
    for name in BENIGN_WARNINGS:
        logger = logging.getLogger(logger_name(name))
        if not any(isinstance(f, ErrorsOnly) for f in logger.filters):
            logger.addFilter(ErrorsOnly())


def setup_worker() -> None:
    """Ray's ``worker_process_setup_hook`` for a local Ray: :func:`quiet_benign_warnings`, and
    ``RAY_ADDRESS`` set to the worker's own cluster.

    Ray's State API client (the placement-group cleaner's) finds its cluster by
    ``RAY_ADDRESS``, else by looking for Ray's processes on the machine; where several Ray
    instances run (other users, other sessions) that look-up raises ``ConnectionError``, and
    the cleaner's thread died with a 20-line traceback in the stage's output.
    """
    import os

    import ray

    quiet_benign_warnings()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
