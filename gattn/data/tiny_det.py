"""Tiny-det: many small look-alike objects whose class only a distant coloured cue tells.

A detection twin of :mod:`gattn.data.cue_seg` for the article's first scenario, small-object
detection ("PPM + large-kernel convolution + a P2 level: keep the detail, strengthen the global
context"; Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017, for P2).

Generative rule, per image of side ``S``:

1. Background: achromatic smooth texture plus per-pixel noise (grey, R = G = B), clipped below
   the item grey level.
2. The cue: one ``cue_px`` square in colour ``CUE_PALETTE[c]``, ``c`` the image's cue class.
3. Objects (the boxes to detect): hollow rectangles ("rings", stroke ``ring_width``) of sides
   ``min_object_px``..``max_object_px`` (aspect within 3:4..4:3), every one at least
   ``cue_clearance * S`` away from the cue. **Every object's class is ``c``**: all objects are
   drawn alike whatever their class, so a detector can tell *where* an object is from its
   own pixels, but *which* class only from the cue, elsewhere in the image.
4. Distractors (clutter, not to be detected): filled squares, discs and crosses of the same
   grey and the same sizes. At 4-8 px a ring differs from a filled square by a 2-4 px hole:
   telling them apart needs stride-4 (P2) detail.

Objects and distractors keep ``gap_px`` of background between each other and the cue. Object
and distractor sizes are in pixels (small objects stay small in large images); their numbers
are per 128 x 128 px and scale with the image area; the clearance is a fraction of ``S``.

The layout (cue position, items, texture) comes from the sample's generator; the class ``c``
is passed in (drawn by the caller from a separate stream), so two images of the same layout
and different classes differ only in the cue's pixels (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gattn.data.cue_seg import CUE_NAMES, CUE_PALETTE, smooth_texture

__all__ = ["DISTRACTOR_KINDS", "TinyDetConfig", "tiny_det_sample"]

DISTRACTOR_KINDS: tuple[str, ...] = ("square", "disc", "cross")
_AREA = 128 * 128  # object and distractor counts are per this many pixels
_TRIES = 100


@dataclass(frozen=True)
class TinyDetConfig:
    """Knobs of the tiny-det generator.

    Args:
        image_size: side of the square image in pixels.
        num_cues: number of cue colours K = the number of object classes (labels 0..K-1).
        min_objects: fewest objects per 128 x 128 px (scaled with the image area, at least 1).
        max_objects: most objects per 128 x 128 px.
        min_distractors: fewest distractors per 128 x 128 px (0 allowed).
        max_distractors: most distractors per 128 x 128 px.
        min_object_px: smallest object (and distractor) side in pixels.
        max_object_px: largest object (and distractor) side in pixels.
        ring_width: stroke of an object's outline in pixels (its hole is at least 2 px).
        distractor_kinds: distractor shapes (chosen at random).
        cue_px: side of the square cue in pixels.
        cue_clearance: smallest gap between the cue and any object, as a fraction of
            ``image_size``. The difficulty knob: a detector whose receptive field is narrower
            than this cannot see the cue from an object.
        gap_px: smallest background gap between any two items (objects, distractors, cue).
        background_level: mean grey level of the background.
        texture_amplitude: grey-level amplitude of the smooth background texture.
        texture_cells: number of texture cells along a side (higher = finer texture).
        noise_std: grey-level std of the per-pixel noise added to the texture.
        item_level: grey level of objects and distractors (the background is clipped below it).
    """

    image_size: int = 128
    num_cues: int = 3
    min_objects: int = 6
    max_objects: int = 12
    min_distractors: int = 4
    max_distractors: int = 8
    min_object_px: int = 4
    max_object_px: int = 16
    ring_width: int = 1
    distractor_kinds: tuple[str, ...] = DISTRACTOR_KINDS
    cue_px: int = 8
    cue_clearance: float = 0.25
    gap_px: int = 1
    background_level: int = 90
    texture_amplitude: float = 25.0
    texture_cells: int = 5
    noise_std: float = 6.0
    item_level: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "distractor_kinds", tuple(self.distractor_kinds))
        s = self.image_size
        _check(s >= 32, "image_size", s, "an int >= 32")
        _check(
            1 <= self.num_cues <= len(CUE_PALETTE),
            "num_cues",
            self.num_cues,
            f"in [1, {len(CUE_PALETTE)}]",
        )
        _check(self.ring_width >= 1, "ring_width", self.ring_width, ">= 1")
        smallest = 2 * self.ring_width + 2
        _check(
            self.min_object_px >= smallest,
            "min_object_px",
            self.min_object_px,
            f">= 2 * ring_width + 2 = {smallest} (a ring needs a hole)",
        )
        _check(
            self.min_object_px <= self.max_object_px <= s // 2,
            "max_object_px",
            self.max_object_px,
            f"in [min_object_px={self.min_object_px}, image_size / 2 = {s // 2}]",
        )
        _check(self.min_objects >= 1, "min_objects", self.min_objects, ">= 1")
        _check(
            self.max_objects >= self.min_objects,
            "max_objects",
            self.max_objects,
            f">= min_objects ({self.min_objects})",
        )
        _check(self.min_distractors >= 0, "min_distractors", self.min_distractors, ">= 0")
        _check(
            self.max_distractors >= self.min_distractors,
            "max_distractors",
            self.max_distractors,
            f">= min_distractors ({self.min_distractors})",
        )
        bad = [k for k in self.distractor_kinds if k not in DISTRACTOR_KINDS]
        _check(
            bool(self.distractor_kinds) and not bad,
            "distractor_kinds",
            self.distractor_kinds,
            f"a non-empty subset of {DISTRACTOR_KINDS}",
        )
        _check(2 <= self.cue_px <= s // 4, "cue_px", self.cue_px, f"in [2, {s // 4}]")
        _check(0.0 <= self.cue_clearance < 1.0, "cue_clearance", self.cue_clearance, "in [0, 1)")
        _check(self.gap_px >= 0, "gap_px", self.gap_px, ">= 0")
        _check(self.texture_cells >= 1, "texture_cells", self.texture_cells, ">= 1")
        _check(
            self.texture_amplitude >= 0 and self.noise_std >= 0,
            "texture_amplitude/noise_std",
            (self.texture_amplitude, self.noise_std),
            ">= 0",
        )
        _check(
            0 <= self.background_level < self.item_level <= 255,
            "item_level",
            self.item_level,
            f"in (background_level={self.background_level}, 255]",
        )

    @property
    def num_classes(self) -> int:
        return self.num_cues

    @property
    def class_names(self) -> list[str]:
        return [f"cue_{name}" for name in CUE_NAMES[: self.num_cues]]

    def counts(self, low: int, high: int) -> tuple[int, int]:
        """A per-128²-px count range at this image size."""
        scale = self.image_size**2 / _AREA
        return round(low * scale), max(round(low * scale), round(high * scale))


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"tiny-det: {name}={value!r} is invalid, expected {expected}")


def shape_mask(kind: str, w: int, h: int, ring_width: int = 1) -> np.ndarray:
    """The ``(h, w)`` pixels of an item: ``ring`` (an object) or a distractor kind."""
    yy, xx = np.mgrid[:h, :w]
    if kind == "ring":
        t = ring_width
        return ~((yy >= t) & (yy < h - t) & (xx >= t) & (xx < w - t))
    if kind == "square":
        return np.ones((h, w), bool)
    if kind == "disc":
        return ((yy + 0.5 - h / 2) / (h / 2)) ** 2 + ((xx + 0.5 - w / 2) / (w / 2)) ** 2 <= 1.0
    bar_h, bar_w = max(1, h // 3), max(1, w // 3)  # cross: a centred plus sign
    y0, x0 = (h - bar_h) // 2, (w - bar_w) // 2
    return ((yy >= y0) & (yy < y0 + bar_h)) | ((xx >= x0) & (xx < x0 + bar_w))


def _free(taken: np.ndarray, w: int, h: int, gap: int) -> np.ndarray:
    """``(S - h + 1, S - w + 1)``: where a ``w`` x ``h`` item's top-left corner may go so that
    the item and ``gap`` px around it are clear of ``taken`` (a summed-area table, O(S²))."""
    s = taken.shape[0]
    padded = np.pad(taken, gap).cumsum(0, dtype=np.int32).cumsum(1)
    table = np.pad(padded, ((1, 0), (1, 0)))
    ny, nx, hh, ww = s - h + 1, s - w + 1, h + 2 * gap, w + 2 * gap
    top, bottom = table[:ny], table[hh : hh + ny]
    total = bottom[:, ww : ww + nx] - bottom[:, :nx] - top[:, ww : ww + nx] + top[:, :nx]
    return total == 0


def _cue_distance(cue: tuple[int, int, int], w: int, h: int, s: int) -> np.ndarray:
    """Distance from every ``w`` x ``h`` item position (as in :func:`_free`) to the cue box."""
    cx, cy, side = cue
    xs, ys = np.arange(s - w + 1), np.arange(s - h + 1)
    dx = np.maximum(np.maximum(cx - (xs + w), xs - (cx + side)), 0)
    dy = np.maximum(np.maximum(cy - (ys + h), ys - (cy + side)), 0)
    return np.hypot(dy[:, None], dx[None, :])


def _sizes(cfg: TinyDetConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 2)`` item sizes (w, h): a side, and the other within 3:4..4:3 of it."""
    side = rng.integers(cfg.min_object_px, cfg.max_object_px + 1, size=n)
    other = np.rint(side * np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3), size=n)))
    other = np.clip(other, cfg.min_object_px, cfg.max_object_px).astype(np.int64)
    flip = rng.integers(2, size=n).astype(bool)
    return np.stack([np.where(flip, other, side), np.where(flip, side, other)], 1)


def _layout(
    cfg: TinyDetConfig, rng: np.random.Generator
) -> tuple[tuple[int, int, int], list[tuple[str, int, int, int, int]]] | None:
    """The cue ``(x, y, side)`` and items ``(kind, x, y, w, h)`` (objects first), or None when
    this draw left no room for an item."""
    s, gap = cfg.image_size, cfg.gap_px
    cx, cy = (int(v) for v in rng.integers(0, s - cfg.cue_px + 1, size=2))
    cue = (cx, cy, cfg.cue_px)
    taken = np.zeros((s, s), bool)
    taken[cy : cy + cfg.cue_px, cx : cx + cfg.cue_px] = True
    lo, hi = cfg.counts(cfg.min_objects, cfg.max_objects)
    n_obj = max(1, int(rng.integers(lo, hi + 1)))
    lo, hi = cfg.counts(cfg.min_distractors, cfg.max_distractors)
    n_dis = int(rng.integers(lo, hi + 1))
    kinds = ["ring"] * n_obj + [
        cfg.distractor_kinds[k] for k in rng.integers(len(cfg.distractor_kinds), size=n_dis)
    ]
    items: list[tuple[str, int, int, int, int]] = []
    for kind, (w, h) in zip(kinds, _sizes(cfg, rng, len(kinds)), strict=True):
        w, h = int(w), int(h)
        ok = _free(taken, w, h, gap)
        if kind == "ring":
            ok &= _cue_distance(cue, w, h, s) >= cfg.cue_clearance * s
        ys, xs = np.nonzero(ok)
        if not len(ys):
            return None
        pick = int(rng.integers(len(ys)))
        x, y = int(xs[pick]), int(ys[pick])
        taken[y : y + h, x : x + w] = True
        items.append((kind, x, y, w, h))
    return cue, items


def tiny_det_sample(
    cfg: TinyDetConfig, rng: np.random.Generator, cue_class: int
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Draw one tiny-det image.

    Args:
        cfg: generator config.
        rng: the sample's own generator (seeded from (seed, index) by the caller): the layout.
        cue_class: the class of every object in the image, in ``[0, num_cues)``.

    Returns:
        ``(image (S, S, 3) uint8, target, meta)``: ``target`` holds ``boxes`` ``(N, 4)``
        float32 ``(x0, y0, x1, y1)`` in pixels (pixel edges: an object on columns ``x..x+w-1``
        spans ``x0 = x, x1 = x + w``) and ``labels`` ``(N,)`` int64 (all ``cue_class``); meta
        holds the cue class, the cue box ``[x, y, side]`` and the distractors'
        ``[kind, x0, y0, x1, y1]``.
    """
    if not 0 <= cue_class < cfg.num_cues:
        raise ValueError(
            f"tiny-det: cue_class={cue_class!r} is invalid, expected in [0, {cfg.num_cues})"
        )
    s = cfg.image_size
    for _ in range(_TRIES):
        drawn = _layout(cfg, rng)
        if drawn is not None:
            break
    else:
        raise ValueError(
            f"tiny-det: no room for the objects at image_size={s}, cue_clearance="
            f"{cfg.cue_clearance}, max_objects={cfg.max_objects}, max_distractors="
            f"{cfg.max_distractors}, max_object_px={cfg.max_object_px}; lower one of them"
        )
    cue, items = drawn
    grey = (
        cfg.background_level
        + cfg.texture_amplitude * smooth_texture(rng, s, cfg.texture_cells)
        + rng.normal(0.0, cfg.noise_std, size=(s, s))
    )
    grey = np.clip(np.rint(grey), 0, cfg.item_level - 1)
    for kind, x, y, w, h in items:
        grey[y : y + h, x : x + w][shape_mask(kind, w, h, cfg.ring_width)] = cfg.item_level
    image = np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    cx, cy, side = cue
    image[cy : cy + side, cx : cx + side] = CUE_PALETTE[cue_class]
    boxes = [(x, y, x + w, y + h) for kind, x, y, w, h in items if kind == "ring"]
    target: dict[str, np.ndarray] = {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "labels": np.full(len(boxes), cue_class, np.int64),
    }
    meta: dict[str, Any] = {
        "cue_class": int(cue_class),
        "cue_box": [cx, cy, side],
        "distractors": [[k, x, y, x + w, y + h] for k, x, y, w, h in items if k != "ring"],
    }
    return image, target, meta
