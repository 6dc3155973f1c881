"""Which global-context strategy fits a memory budget: measured results first, a rule of thumb
as the fallback.

The source article closes with a rule of thumb (``select_global_strategy``): at least 24 GB of
accelerator memory, full global attention; at least 12 GB, window attention plus global tokens
(Swin, Liu et al. 2021, with global tokens as in Longformer/BigBird-style sparse attention);
less, light modules (squeeze-excitation, CBAM, pyramid pooling, large kernels). Its thresholds
are fixed guesses. :func:`recommend` answers from measurements instead: among the configs the
``tune`` stage trained (its Pareto front of quality vs peak memory vs speed), the best quality
whose measured peak fits the budget. The rule of thumb (:data:`DEFAULT_TABLE`, thresholds read
as GiB) is used only when there are no measured results for the task or none fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["DEFAULT_TABLE", "Recommendation", "Strategy", "best_fitting", "recommend"]


@dataclass(frozen=True)
class Strategy:
    """One row of the default table.

    Attributes:
        min_gib: Smallest budget (GiB) the row applies to.
        name: The strategy.
        modules: Registry blocks (:func:`gattn.modules.available`) it uses.
        recipe: A model of this project that follows it.
        why: The reasoning behind the threshold.
    """

    min_gib: float
    name: str
    modules: tuple[str, ...]
    recipe: str
    why: str


DEFAULT_TABLE: tuple[Strategy, ...] = (
    Strategy(
        24.0,
        "full global attention",
        ("global_attn",),
        "gattn_vit_global",
        "every token attends to every token: O(N^2) scores per head (fused kernels avoid "
        "storing them, but compute still grows as N^2)",
    ),
    Strategy(
        12.0,
        "window attention + global tokens",
        ("window_attn", "global_tokens"),
        "gattn_swin_global_tokens",
        "local windows cost O(N w^2); a few global tokens carry image-wide context, O(N (w^2 + g))",
    ),
    Strategy(
        0.0,
        "light global modules",
        ("se", "cbam", "ppm", "large_kernel"),
        "gattn_resnet_global_tiny",
        "pooled context (SE, CBAM, PPM) and large kernels add global reach for memory linear "
        "in the feature map",
    ),
)


@dataclass(frozen=True)
class Recommendation:
    """What :func:`recommend` chose and why.

    Attributes:
        source: ``"measured"`` (a trained config) or ``"default table"``.
        task: ``"seg"`` or ``"cls"``.
        memory_gib: The budget asked about.
        choice: The chosen Pareto point (measured) or table row (as a dict).
        reason: One paragraph: the rule applied and the figures behind it.
        runner_up: The best measured config that did not fit, if one beats the choice.
    """

    source: Literal["measured", "default table"]
    task: str
    memory_gib: float
    choice: dict[str, Any]
    reason: str
    runner_up: dict[str, Any] | None = field(default=None)

    def describe(self) -> str:
        """A human-readable answer with the figures."""
        c = self.choice
        lines = [f"task {self.task}, budget {self.memory_gib:g} GiB -> source: {self.source}"]
        if self.source == "measured":
            lines += [
                f"choice: trial {c.get('trial')}: {c.get('summary', '')}",
                f"  {c['metric']} {c['quality']:.4f}, peak memory {c['peak_memory_gib']:.3f} GiB "
                f"(batch {c['train']['batch_size']}, {c['train']['img_size']}px), "
                f"{c['images_per_s']:.1f} images/s, {c['params']:,} parameters",
            ]
        else:
            lines.append(
                f"choice: {c['name']} (modules: {', '.join(c['modules'])}; recipe: {c['recipe']})"
            )
        lines.append(f"why: {self.reason}")
        return "\n".join(lines)


def best_fitting(
    points: Sequence[Mapping[str, Any]], memory_gib: float
) -> Mapping[str, Any] | None:
    """The highest-quality point whose ``peak_memory_gib`` fits ``memory_gib`` (ties: less
    memory, then faster), or None."""
    fits = [p for p in points if p["peak_memory_gib"] <= memory_gib]
    if not fits:
        return None
    return max(fits, key=lambda p: (p["quality"], -p["peak_memory_gib"], p["images_per_s"]))


def _table_row(memory_gib: float) -> Strategy:
    return next(s for s in DEFAULT_TABLE if memory_gib >= s.min_gib)


def recommend(
    task: str,
    memory_gib: float,
    points: Sequence[Mapping[str, Any]] = (),
    measured_task: str | None = None,
) -> Recommendation:
    """Recommend a global-context strategy for a training-memory budget.

    Args:
        task: ``"seg"`` or ``"cls"``.
        memory_gib: Memory available for training, GiB.
        points: Measured configs (the ``tune`` stage's Pareto front, ``pareto.json``
            ``points``): ``quality``, ``metric``, ``peak_memory_gib``, ``images_per_s``,
            ``params``, ``model``, ``train``, ``trial``.
        measured_task: The task the points were measured on.

    Returns:
        The measured config of best quality that fits, or the default table's row when there
        are no measurements for ``task`` or none fits (the reason says which).

    Raises:
        ValueError: ``memory_gib`` is not positive.
    """
    if memory_gib <= 0:
        raise ValueError(f"memory must be positive (GiB), got {memory_gib}")
    usable = list(points) if measured_task == task else []
    best = best_fitting(usable, memory_gib)
    if best is not None:
        better = [p for p in usable if p["quality"] > best["quality"]]
        runner_up = min(better, key=lambda p: p["peak_memory_gib"]) if better else None
        fitting = sum(p["peak_memory_gib"] <= memory_gib for p in usable)
        reason = (
            f"highest {best['metric']} among the {fitting} "
            f"of {len(usable)} measured Pareto-optimal configs whose measured training peak "
            f"({best['peak_memory_gib']:.3f} GiB here) fits {memory_gib:g} GiB"
        )
        if runner_up is not None:
            reason += (
                f"; a better one ({runner_up['metric']} {runner_up['quality']:.4f}, trial "
                f"{runner_up.get('trial')}) needs {runner_up['peak_memory_gib']:.3f} GiB"
            )
        else:
            reason += "; it is the best measured config overall"
        return Recommendation(
            "measured",
            task,
            memory_gib,
            dict(best),
            reason,
            None if runner_up is None else dict(runner_up),
        )

    row = _table_row(memory_gib)
    if not points:
        why = "no measured results (run `gattn tune`)"
    elif measured_task != task:
        why = f"the measured results are for task {measured_task!r}, not {task!r}"
    else:
        smallest = min(p["peak_memory_gib"] for p in points)
        why = f"no measured config fits (the smallest needs {smallest:.3f} GiB)"
    reason = (
        f"{why}; the default table (the source article's rule of thumb: >= 24 GiB full "
        f"attention, >= 12 GiB windows + global tokens, else light modules) gives "
        f"'{row.name}' for {memory_gib:g} GiB: {row.why}"
    )
    return Recommendation("default table", task, memory_gib, row.__dict__.copy(), reason)
