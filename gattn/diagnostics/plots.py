"""Figures people would rather see than read: sample grids, overlays. PNG, written atomically."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from gattn.data.datasets import IGNORE_INDEX  # noqa: E402

# Distinct colours for class ids 1..; id 0 (background) stays transparent in overlays.
_CLASS_COLOURS = matplotlib.color_sequences["tab10"]


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save ``fig`` as PNG through a temporary file and ``os.replace``, then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def colorize_mask(mask: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """RGBA image of a class-id mask: class ``k >= 1`` in colour ``k``, background clear."""
    rgba = np.zeros((*mask.shape, 4), np.float32)
    for k in np.unique(mask):
        if k == 0 or k == ignore_index:
            continue
        rgba[mask == k] = (*_CLASS_COLOURS[(int(k) - 1) % len(_CLASS_COLOURS)], 0.55)
    return rgba


def draw_boxes(
    ax: Axes, boxes: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
) -> list[str]:
    """Outline ``(N, 4)`` xyxy pixel ``boxes`` on ``ax``, label ``k`` (0-based) in colour ``k``;
    returns the names of the labels drawn, sorted."""
    for (x0, y0, x1, y1), k in zip(
        np.asarray(boxes).tolist(), np.asarray(labels).tolist(), strict=True
    ):
        colour = _CLASS_COLOURS[int(k) % len(_CLASS_COLOURS)]
        # pixel (i, j) covers [j - 0.5, j + 0.5] in imshow's coordinates; boxes are pixel edges
        ax.add_patch(
            Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=0.8, ec=colour)
        )
    return [class_names[int(k)] for k in np.unique(np.asarray(labels))]


def sample_grid(
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray | int | Mapping[str, np.ndarray]],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    columns: int = 4,
    title: str | None = None,
) -> Path:
    """A grid of samples with their labels: a class name per image, or the mask overlaid.

    Args:
        images: ``(H, W, 3)`` or ``(H, W)`` uint8 arrays.
        targets: per image, an int class (classification), an ``(H, W)`` mask or
            ``{"boxes": (N, 4) xyxy px, "labels": (N,)}`` (detection: outlined).
        class_names: name of every class id.
        path: PNG to write.
        columns: images per row.
        title: figure title.
    """
    n = len(images)
    if n == 0 or n != len(targets):
        raise ValueError(f"sample_grid needs one target per image, got {n} and {len(targets)}")
    columns = min(columns, n)
    rows = -(-n // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, target in zip(axes.flat, images, targets, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        if isinstance(target, Mapping):
            present = draw_boxes(ax, target["boxes"], target["labels"], class_names)
            ax.set_title(", ".join(present) or "no boxes", fontsize=8)
        elif isinstance(target, np.ndarray):
            ax.imshow(colorize_mask(target))
            present = [class_names[int(k)] for k in np.unique(target) if 0 < k < len(class_names)]
            ax.set_title(", ".join(present) or class_names[0], fontsize=8)
        else:
            ax.set_title(class_names[int(target)], fontsize=8)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def overlay_heatmap(
    image: np.ndarray,
    heatmaps: dict[str, np.ndarray],
    path: str | os.PathLike[str],
    alpha: float = 0.5,
    cmap: str = "jet",
    title: str | None = None,
) -> Path:
    """The image, then each heatmap (Grad-CAM, rollout, ...) over it, side by side.

    Args:
        image: ``(H, W, 3)`` or ``(H, W)`` array (uint8 or floats in ``[0, 1]``).
        heatmaps: name to ``(h, w)`` map; stretched over the image, so a patch-grid map works.
        path: PNG to write.
        alpha: Opacity of the heatmaps.
        cmap: Matplotlib colour map of the heatmaps.
        title: Figure title.
    """
    H, W = image.shape[:2]
    panels = len(heatmaps) + 1
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 2.8), squeeze=False)
    gray = "gray" if image.ndim == 2 else None
    axes[0, 0].imshow(image, cmap=gray)
    axes[0, 0].set_title("image", fontsize=8)
    for ax, (name, heat) in zip(axes[0, 1:], heatmaps.items(), strict=True):
        ax.imshow(image, cmap=gray)
        ax.imshow(heat, cmap=cmap, alpha=alpha, extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        ax.set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def heatmap(
    values: np.ndarray,
    path: str | os.PathLike[str],
    title: str | None = None,
    cmap: str = "viridis",
    log: bool = False,
) -> Path:
    """One ``(H, W)`` map with a colour bar (e.g. an effective receptive field, ``log=True``)."""
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    shown = np.log10(values + values.max() * 1e-6 + 1e-30) if log else values
    image = ax.imshow(shown, cmap=cmap)
    fig.colorbar(image, ax=ax, fraction=0.046, label="log10" if log else None)
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def confusion_matrix(
    matrix: np.ndarray,
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) as row-normalised shares
    (each row's recall, so rare classes are as readable as common ones), with the counts.

    Args:
        matrix: ``(K, K)`` counts, ``matrix[i, j]`` = samples (pixels) of class ``i``
            predicted as ``j``.
        class_names: Name of every class.
        path: PNG to write.
        title: Figure title.
    """
    counts = np.asarray(matrix, dtype=np.float64)
    k = counts.shape[0]
    if counts.shape != (k, k) or len(class_names) != k:
        raise ValueError(
            f"need a square matrix and {k} names, got {counts.shape}, {len(class_names)}"
        )
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = 1.2 + 0.55 * k
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    for i in range(k):
        for j in range(k):
            colour = "white" if shares[i, j] > 0.5 else "black"
            text = f"{shares[i, j]:.2f}\n{int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=6, color=colour)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path)
