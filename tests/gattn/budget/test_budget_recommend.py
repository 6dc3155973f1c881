"""The recommendation follows the measured Pareto points, and the default table otherwise."""

from __future__ import annotations

import pytest

from gattn.budget.recommend import DEFAULT_TABLE, best_fitting, recommend


def point(trial: str, quality: float, memory: float, speed: float = 100.0) -> dict:
    return {
        "trial": trial,
        "summary": trial,
        "quality": quality,
        "metric": "miou",
        "peak_memory_gib": memory,
        "images_per_s": speed,
        "params": 1000,
        "model": {"backbone": trial},
        "train": {"batch_size": 8, "img_size": 64, "lr": 1e-3},
    }


POINTS = [point("light", 0.40, 0.5), point("windows", 0.60, 4.0), point("full", 0.75, 20.0)]


@pytest.mark.parametrize(
    ("memory", "expected"), [(0.5, "light"), (3.9, "light"), (4.0, "windows"), (100, "full")]
)
def test_measured_choice_is_the_best_that_fits(memory: float, expected: str) -> None:
    rec = recommend("seg", memory, POINTS, "seg")
    assert rec.source == "measured"
    assert rec.choice["trial"] == expected
    # Brute force: the best quality among the points that fit.
    fits = [p for p in POINTS if p["peak_memory_gib"] <= memory]
    assert rec.choice["quality"] == max(p["quality"] for p in fits)


def test_reason_names_the_better_config_that_does_not_fit() -> None:
    rec = recommend("seg", 5.0, POINTS, "seg")
    assert rec.runner_up is not None and rec.runner_up["trial"] == "full"
    assert "20.000 GiB" in rec.reason
    text = rec.describe()
    assert "windows" in text and "0.6000" in text and "4.000 GiB" in text


def test_ties_prefer_less_memory_then_speed() -> None:
    pts = [point("a", 0.5, 2.0), point("b", 0.5, 1.0, 10.0), point("c", 0.5, 1.0, 20.0)]
    assert best_fitting(pts, 10)["trial"] == "c"


@pytest.mark.parametrize(
    ("points", "task", "why"),
    [
        ([], None, "no measured results"),
        (POINTS, "cls", "measured results are for task 'cls'"),
        (POINTS[1:], "seg", "no measured config fits"),
    ],
)
def test_falls_back_to_the_default_table(points: list, task: str | None, why: str) -> None:
    rec = recommend("seg", 1.0, points, task)
    assert rec.source == "default table"
    assert why in rec.reason
    assert rec.choice["name"] == "light global modules"


@pytest.mark.parametrize(
    ("memory", "name"),
    [
        (32, "full global attention"),
        (24, "full global attention"),
        (12, "window attention + global tokens"),
        (11.9, "light global modules"),
    ],
)
def test_default_table_thresholds(memory: float, name: str) -> None:
    assert recommend("cls", memory).choice["name"] == name
    assert [s.min_gib for s in DEFAULT_TABLE] == sorted(
        (s.min_gib for s in DEFAULT_TABLE), reverse=True
    )


def test_memory_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        recommend("seg", 0)
