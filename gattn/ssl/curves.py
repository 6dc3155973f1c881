"""Training curves of a self-supervised run as a PNG: one panel per logged series.

Used for the loss and learning rate of any objective, and for DINO's collapse diagnostics
(Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, §5.3):
the teacher entropy, with its two collapse levels drawn in (0: one dimension wins; ``log K``:
uniform outputs), and the KL from each teacher output to the batch mean (0: every image gets
the same output).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gattn.diagnostics.plots import save_figure  # noqa: E402

__all__ = ["curves_figure", "dino_collapse_references"]


def dino_collapse_references(out_dim: int) -> dict[str, dict[str, float]]:
    """The levels that mean collapse, per series of :func:`gattn.ssl.collapse_stats`."""
    return {
        "teacher_entropy": {"one-hot collapse": 0.0, "uniform collapse (log K)": math.log(out_dim)},
        "teacher_kl_to_mean": {"identical outputs": 0.0},
    }


def curves_figure(
    steps: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    title: str | None = None,
    references: Mapping[str, Mapping[str, float]] | None = None,
    xlabel: str = "step",
) -> Path:
    """One panel per series against ``steps``, with optional labelled horizontal lines.

    Args:
        steps: x values shared by every series.
        series: ``name -> values`` (each as long as ``steps``).
        path: PNG to write (atomically).
        title: Figure title.
        references: ``name -> {label: y}``: dashed lines drawn in that series' panel.
        xlabel: x-axis label.

    Raises:
        ValueError: no series, or a series whose length differs from ``steps``.
    """
    if not series:
        raise ValueError("no series to plot")
    for name, values in series.items():
        if len(values) != len(steps):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(steps)} steps")
    references = references or {}
    fig, axes = plt.subplots(1, len(series), figsize=(3.4 * len(series), 2.8), squeeze=False)
    for ax, (name, values) in zip(axes[0], series.items(), strict=True):
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, lw=1.2)
        for i, (label, y) in enumerate(references.get(name, {}).items()):
            ax.axhline(y, ls="--", lw=0.8, color=f"C{i + 1}", label=label)
        if references.get(name):
            ax.legend(fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
