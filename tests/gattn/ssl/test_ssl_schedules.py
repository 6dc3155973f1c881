"""Warm-up + cosine schedule: endpoints, monotonic pieces, midpoint, tensor form."""

from __future__ import annotations

import math

import pytest
import torch

from gattn.ssl.schedules import schedule_values, warmup_cosine


def test_endpoints_and_midpoint() -> None:
    kw = {"total_steps": 110, "base": 1.0, "final": 0.1, "warmup_steps": 10, "warmup_start": 0.0}
    assert warmup_cosine(0, **kw) == pytest.approx(0.0)
    assert warmup_cosine(5, **kw) == pytest.approx(0.5)
    assert warmup_cosine(10, **kw) == pytest.approx(1.0)
    assert warmup_cosine(60, **kw) == pytest.approx(0.55)  # half-way down the cosine
    assert warmup_cosine(35, **kw) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert warmup_cosine(110, **kw) == pytest.approx(0.1)
    assert warmup_cosine(500, **kw) == pytest.approx(0.1)


def test_monotone_warmup_then_decay() -> None:
    values = schedule_values(100, base=2.0, final=0.0, warmup_steps=20, warmup_start=0.5)
    assert values.dtype == torch.float64 and values.shape == (100,)
    assert bool((values[1:21] > values[:20]).all())
    assert bool((values[21:] < values[20:-1]).all())
    assert values.argmax().item() == 20
    expected = [warmup_cosine(s, 100, 2.0, 0.0, 20, 0.5) for s in range(100)]
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64))


def test_fractional_steps_and_constant_schedule() -> None:
    assert warmup_cosine(2.5, 10, 1.0, 0.0, warmup_steps=5) == pytest.approx(0.5)
    assert warmup_cosine(7, 5, 0.07, 0.07, warmup_steps=5, warmup_start=0.04) == 0.07


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        warmup_cosine(-1, 10, 1.0)
    with pytest.raises(ValueError):
        warmup_cosine(12, 10, 1.0, 0.0, warmup_steps=10)
    with pytest.raises(ValueError):
        schedule_values(0, 1.0)
