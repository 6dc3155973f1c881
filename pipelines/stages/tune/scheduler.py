"""ASHA that lets the sweep's fixed points run to the end.

ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning") stops a trial
at a rung when it is below the top ``1 / reduction_factor`` of the trials seen there. The fixed
points (``tune.points_to_evaluate``: the local baseline and each global module at one setting)
are the comparison the sweep must always hold; judged at the first rung, a global module that
finds the distant cue in its last epochs looks like the local baseline and was stopped (PPM:
0.19 mIoU after 2 epochs, 0.79 after 4). Their results still count in the rungs, so they set
the bar for the sampled trials.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def is_point(config: Mapping[str, Any], points: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a trial's ``config`` is one of ``points`` (every key of the point equal)."""
    return any(all(config.get(k) == v for k, v in point.items()) for point in points)


def points_run_to_end(
    points: Sequence[Mapping[str, Any]], time_attr: str, max_t: int, **asha: Any
) -> Any:
    """An ``ASHAScheduler(time_attr, max_t, **asha)`` that never stops a trial whose config is
    one of ``points`` before ``max_t``."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class PointsRunToEnd(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            action: str = super().on_trial_result(tune_controller, trial, result)
            early = result.get(time_attr, max_t) < max_t
            if action == TrialScheduler.STOP and early and is_point(trial.config, points):
                return str(TrialScheduler.CONTINUE)
            return action

    return PointsRunToEnd(time_attr=time_attr, max_t=max_t, **asha)
