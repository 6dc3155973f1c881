"""Cue-conditioned segmentation: one distant coloured cue names every shape in the image.

Identical grey shapes lie on an achromatic textured background. A single small coloured square
(the cue) sits somewhere else; its colour decides the class of *every* shape. A model whose
receptive field covers a shape but not the cue can find the shape but can only guess its class,
so the task separates local models from models with global context (the same idea as the
long-range dependency benchmarks of Tay et al., "Long Range Arena", ICLR 2021).

Label rules: mask 0 is background, ``cue_class`` (1..K) on every shape pixel. The cue itself is
labelled background: it is the context, not an object. Every size is a fraction of
``image_size``, so the same config scales from 64 px to 1024 px, where the cue lies outside most
sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CUE_PALETTE", "SHAPE_KINDS", "CueSegConfig", "cue_seg_sample"]

# Saturated, well separated colours; the background and the shapes are grey (R = G = B).
CUE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40),
    (40, 190, 40),
    (50, 90, 235),
    (235, 205, 30),
    (200, 60, 200),
    (30, 200, 210),
)
CUE_NAMES: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPE_KINDS: tuple[str, ...] = ("disc", "square", "triangle")


@dataclass(frozen=True)
class CueSegConfig:
    """Knobs of the cue-seg generator (sizes are fractions of ``image_size``).

    Args:
        image_size: side of the square image in pixels.
        num_cues: number of cue colours K; the data set has K + 1 classes (0 = background).
        min_shapes: fewest shapes per image.
        max_shapes: most shapes per image.
        shape_size: shape diameter / side.
        shape_kinds: shapes drawn (chosen at random, independent of the class).
        cue_size: side of the square cue.
        cue_clearance: smallest gap between the cue and any shape pixel. The difficulty knob:
            a model whose receptive field is narrower than this cannot see the cue from a shape.
        background_level: mean grey level of the background.
        texture_amplitude: grey-level amplitude of the smooth background texture.
        texture_cells: number of texture cells along a side (higher = finer texture).
        noise_std: grey-level std of the per-pixel noise added to the texture.
        shape_level: grey level of every shape (the background is clipped below it).
    """

    image_size: int = 64
    num_cues: int = 3
    min_shapes: int = 3
    max_shapes: int = 6
    shape_size: float = 0.14
    shape_kinds: tuple[str, ...] = SHAPE_KINDS
    cue_size: float = 0.1
    cue_clearance: float = 0.25
    background_level: int = 90
    texture_amplitude: float = 25.0
    texture_cells: int = 5
    noise_std: float = 6.0
    shape_level: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape_kinds", tuple(self.shape_kinds))
        _check(self.image_size >= 16, "image_size", self.image_size, "an int >= 16")
        _check(
            1 <= self.num_cues <= len(CUE_PALETTE),
            "num_cues",
            self.num_cues,
            f"in [1, {len(CUE_PALETTE)}]",
        )
        _check(self.min_shapes >= 1, "min_shapes", self.min_shapes, ">= 1")
        _check(
            self.max_shapes >= self.min_shapes,
            "max_shapes",
            self.max_shapes,
            f">= min_shapes ({self.min_shapes})",
        )
        _check(0.0 < self.shape_size < 0.5, "shape_size", self.shape_size, "in (0, 0.5)")
        bad = [k for k in self.shape_kinds if k not in SHAPE_KINDS]
        _check(
            bool(self.shape_kinds) and not bad,
            "shape_kinds",
            self.shape_kinds,
            f"a non-empty subset of {SHAPE_KINDS}",
        )
        _check(0.0 < self.cue_size < 0.5, "cue_size", self.cue_size, "in (0, 0.5)")
        _check(0.0 <= self.cue_clearance < 1.0, "cue_clearance", self.cue_clearance, "in [0, 1)")
        _check(self.texture_cells >= 1, "texture_cells", self.texture_cells, ">= 1")
        _check(
            self.texture_amplitude >= 0 and self.noise_std >= 0,
            "texture_amplitude/noise_std",
            (self.texture_amplitude, self.noise_std),
            ">= 0",
        )
        _check(
            0 <= self.background_level < self.shape_level <= 255,
            "shape_level",
            self.shape_level,
            f"in (background_level={self.background_level}, 255]",
        )

    @property
    def num_classes(self) -> int:
        return self.num_cues + 1

    @property
    def class_names(self) -> list[str]:
        return ["background"] + [f"cue_{name}" for name in CUE_NAMES[: self.num_cues]]


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"cue-seg: {name}={value!r} is invalid, expected {expected}")


def smooth_texture(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [-1, 1]: a smooth ``(size, size)`` texture."""
    grid = rng.uniform(-1.0, 1.0, size=(cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) * cells / size
    i0 = np.minimum(pos.astype(np.int64), cells - 1)
    frac = pos - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def _box_distance(points: np.ndarray, x0: float, y0: float, side: float) -> np.ndarray:
    """Euclidean distance from ``(N, 2)`` (x, y) points to the box ``[x0, x0+side]^2``."""
    dx = np.maximum(np.maximum(x0 - points[:, 0], points[:, 0] - (x0 + side)), 0.0)
    dy = np.maximum(np.maximum(y0 - points[:, 1], points[:, 1] - (y0 + side)), 0.0)
    return np.hypot(dx, dy)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, x0: int, y0: int, d: int) -> None:
    box = (x0, y0, x0 + d - 1, y0 + d - 1)
    if kind == "disc":
        draw.ellipse(box, fill=1)
    elif kind == "square":
        draw.rectangle(box, fill=1)
    else:  # triangle pointing up
        draw.polygon([(x0 + (d - 1) / 2, y0), (x0, y0 + d - 1), (x0 + d - 1, y0 + d - 1)], fill=1)


def cue_seg_sample(
    cfg: CueSegConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw one cue-seg sample.

    Args:
        cfg: generator config.
        rng: the sample's own generator (seeded from (seed, index) by the caller).

    Returns:
        ``(image (S, S, 3) uint8, mask (S, S) uint8, meta)``; meta holds the cue class, the cue
        box ``[x0, y0, side]`` and the shape centres ``(x, y)``.
    """
    s = cfg.image_size
    side = max(2, round(cfg.cue_size * s))
    d = max(3, round(cfg.shape_size * s))
    gap = cfg.cue_clearance * s
    grid = np.stack(np.meshgrid(np.arange(s - d + 1), np.arange(s - d + 1)), -1).reshape(-1, 2)
    centres = grid + (d - 1) / 2  # candidate shape centres with the shape fully inside
    for _ in range(100):
        cx, cy = rng.integers(0, s - side + 1, size=2)
        # +1: the disc/square of diameter d fits in a circle of radius d/sqrt(2) <= d/2 + d/4.
        allowed = centres[_box_distance(centres, cx - 0.5, cy - 0.5, side) >= gap + 0.75 * d + 1]
        if len(allowed):
            break
    else:
        raise ValueError(
            f"cue-seg: no room for shapes at cue_clearance={cfg.cue_clearance}, "
            f"shape_size={cfg.shape_size}, cue_size={cfg.cue_size}; lower one of them"
        )
    cls = int(rng.integers(cfg.num_cues))
    n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    picks = allowed[rng.integers(len(allowed), size=n)]
    kinds = rng.integers(len(cfg.shape_kinds), size=n)

    canvas = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(canvas)
    for (px, py), k in zip(picks, kinds, strict=True):
        x0, y0 = int(round(px - (d - 1) / 2)), int(round(py - (d - 1) / 2))
        _draw_shape(draw, cfg.shape_kinds[k], x0, y0, d)
    shapes = np.asarray(canvas, dtype=bool)

    grey = (
        cfg.background_level
        + cfg.texture_amplitude * smooth_texture(rng, s, cfg.texture_cells)
        + rng.normal(0.0, cfg.noise_std, size=(s, s))
    )
    grey = np.clip(np.rint(grey), 0, cfg.shape_level - 1)
    grey[shapes] = cfg.shape_level
    image = np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    image[cy : cy + side, cx : cx + side] = CUE_PALETTE[cls]
    mask = shapes.astype(np.uint8) * np.uint8(cls + 1)
    meta = {
        "cue_class": cls + 1,
        "cue_box": [int(cx), int(cy), side],
        "shape_centres": picks.round(1).tolist(),
    }
    return image, mask, meta
