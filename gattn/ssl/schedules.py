"""Cosine schedules with a linear warm-up, shared by learning rate, EMA momentum and temperature.

One pure function, :func:`warmup_cosine`, gives every schedule the self-supervised objectives
use, so their math lives in one place:

* learning rate: linear warm-up from 0 to the peak, then cosine decay (Loshchilov & Hutter
  2017, "SGDR: Stochastic Gradient Descent with Warm Restarts"; Goyal et al. 2017 for the
  warm-up), as in MAE (He et al. 2022) and DINO (Caron et al. 2021);
* DINO's teacher EMA momentum: cosine from ``base`` (0.996) up to ``final`` (1.0), no warm-up;
* DINO's teacher temperature: linear warm-up from 0.04 to 0.07, then constant (a cosine from a
  value to itself).

References:
    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
    He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
"""

from __future__ import annotations

import math

import torch

__all__ = ["schedule_values", "warmup_cosine"]


def warmup_cosine(
    step: float,
    total_steps: float,
    base: float,
    final: float = 0.0,
    warmup_steps: float = 0,
    warmup_start: float = 0.0,
) -> float:
    """The value of a warm-up + cosine schedule at ``step``.

    Linear from ``warmup_start`` (at step 0) to ``base`` (at ``warmup_steps``), then a
    half-cosine from ``base`` to ``final`` (at ``total_steps``); ``final`` from then on.
    Steps may be fractional (an epoch plus the fraction of it done).

    Args:
        step: Current step (or epoch), ``>= 0``.
        total_steps: Step at which the schedule reaches ``final``; ``> warmup_steps`` unless
            the cosine part is constant (``base == final``).
        base: Value at the end of the warm-up (the peak of a learning-rate schedule).
        final: Value at ``total_steps`` and after.
        warmup_steps: Length of the linear warm-up (0: none).
        warmup_start: Value at step 0 when there is a warm-up.

    Returns:
        The scheduled value.

    Raises:
        ValueError: a negative ``step`` or ``warmup_steps``, or a cosine part of no length.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step={step} and warmup_steps={warmup_steps} must be >= 0")
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        if base != final:
            raise ValueError(
                f"total_steps={total_steps} must exceed warmup_steps={warmup_steps} "
                "for a decay from base to final"
            )
        return base
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))


def schedule_values(
    total_steps: int,
    base: float,
    final: float = 0.0,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> torch.Tensor:
    """:func:`warmup_cosine` at steps ``0 .. total_steps - 1``, as a float64 tensor.

    As in DINO's schedules, ``final`` is the value *at* ``total_steps``, one step past the
    last entry, so a momentum schedule ends just below its ``final``.

    Args:
        total_steps: Number of values (``>= 1``).
        base, final, warmup_steps, warmup_start: As in :func:`warmup_cosine`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps} must be >= 1")
    return torch.tensor(
        [
            warmup_cosine(s, total_steps, base, final, warmup_steps, warmup_start)
            for s in range(total_steps)
        ],
        dtype=torch.float64,
    )
