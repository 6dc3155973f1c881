"""Pathfinder: are the two markers joined by one curved, dashed path?

After Linsley et al., "Learning long-range spatial dependencies with horizontal gated recurrent
units", NeurIPS 2018, and its use in Tay et al., "Long Range Arena", ICLR 2021.

Every image holds two *main* paths of the same length plus ``num_distractors`` distractor
paths, and two round markers. Positive (label 1): the markers sit on both ends of main path 0.
Negative (label 0): one marker on an end of path 0, the other on an end of path 1. Both classes
therefore show the same number of paths, path ends and markers; only the connection differs, and
following a path of ``path_length`` pixels needs context that long. Every path end reserves a
marker-sized disc whether it carries a marker or not, so the surroundings of an end do not
betray the label. Paths that would leave the image turn towards its centre instead.

The defaults (no extra distractor, mild curvature) are what a small global model learns in a
few CPU minutes at 64 px; ``num_distractors``, ``max_turn`` and ``path_length`` make it harder.

Rendering guarantees (at the default sizes, used by the tests): pixels of different paths (and
their markers) are at Chebyshev distance >= ``separation``; consecutive dashes of one path are
at Chebyshev distance <= gap + 1. So dilating the drawn pixels by one pixel joins each path into
one 8-connected component and keeps different paths apart whenever gap <= 2 and separation >= 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["PathfinderConfig", "pathfinder_sample", "render_paths"]

_STEP = 0.25  # arc-length spacing (px) of the dense points a path is drawn from
_BATCH = 64  # candidate paths drawn at once


@dataclass(frozen=True)
class PathfinderConfig:
    """Knobs of the pathfinder generator (lengths are fractions of ``image_size``).

    Args:
        image_size: side of the square image in pixels.
        path_length: arc length of the two main paths. The difficulty knob: longer paths need
            a longer reach to follow.
        num_distractors: number of extra paths without markers (main path 1 is already one
            in a positive image).
        distractor_length: arc length of a distractor (``None``: same as ``path_length``).
        segment_length: length of the straight pieces a path is made of.
        max_turn: largest change of heading between two pieces, in radians (curvature).
        dash_length: length of a dash.
        gap_length: length of the gap between dashes (0: solid paths).
        line_width: width of a path.
        marker_radius: radius of a marker disc.
        separation: smallest distance between two different paths.
    """

    image_size: int = 64
    path_length: float = 0.75
    num_distractors: int = 0
    distractor_length: float | None = None
    segment_length: float = 0.08
    max_turn: float = 0.3
    dash_length: float = 0.06
    gap_length: float = 0.03
    line_width: float = 0.015
    marker_radius: float = 0.035
    separation: float = 0.06

    def __post_init__(self) -> None:
        _check(self.image_size >= 16, "image_size", self.image_size, "an int >= 16")
        _check(0.0 < self.path_length <= 4.0, "path_length", self.path_length, "in (0, 4]")
        _check(self.num_distractors >= 0, "num_distractors", self.num_distractors, ">= 0")
        if self.distractor_length is not None:
            _check(
                0.0 < self.distractor_length <= 4.0,
                "distractor_length",
                self.distractor_length,
                "None or in (0, 4]",
            )
        _check(
            0.0 < self.segment_length <= self.path_length,
            "segment_length",
            self.segment_length,
            f"in (0, path_length={self.path_length}]",
        )
        _check(0.0 <= self.max_turn <= math.pi, "max_turn", self.max_turn, "in [0, pi]")
        _check(self.dash_length > 0.0, "dash_length", self.dash_length, "> 0")
        _check(self.gap_length >= 0.0, "gap_length", self.gap_length, ">= 0")
        _check(self.line_width > 0.0, "line_width", self.line_width, "> 0")
        _check(self.marker_radius > 0.0, "marker_radius", self.marker_radius, "> 0")
        _check(self.separation >= 0.0, "separation", self.separation, ">= 0")

    def px(self, fraction: float, minimum: int = 1) -> int:
        """A length in whole pixels at this image size (at least ``minimum``)."""
        return max(minimum, round(fraction * self.image_size))

    @property
    def num_classes(self) -> int:
        return 2

    @property
    def class_names(self) -> list[str]:
        return ["disconnected", "connected"]


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"pathfinder: {name}={value!r} is invalid, expected {expected}")


def _disc(radius: float) -> np.ndarray:
    """Integer (dy, dx) offsets of a disc."""
    r = math.floor(radius)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy**2 + dx**2 <= radius**2 + 1e-9
    return np.stack([dy[keep], dx[keep]], 1)


def _stamp(canvas: np.ndarray, yx: np.ndarray, offsets: np.ndarray) -> None:
    """Set ``canvas`` at every ``yx + offset`` inside the image."""
    pts = (yx[:, None, :] + offsets[None]).reshape(-1, 2)
    h, w = canvas.shape
    ok = (pts[:, 0] >= 0) & (pts[:, 0] < h) & (pts[:, 1] >= 0) & (pts[:, 1] < w)
    canvas[pts[ok, 0], pts[ok, 1]] = True


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Chebyshev (square) dilation by ``radius`` pixels, separable, O(H * W)."""
    if radius <= 0:
        return mask.copy()
    out = mask
    for axis in (0, 1):
        c = np.cumsum(
            np.pad(out, [(radius + 1, radius) if a == axis else (0, 0) for a in (0, 1)]),
            axis=axis,
            dtype=np.int32,
        )
        n = out.shape[axis]
        hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + n), axis=axis)
        lo = np.take(c, np.arange(n), axis=axis)
        out = (hi - lo) > 0
    return out


def _dense(vertices: np.ndarray, seg: float) -> np.ndarray:
    """Points every ``_STEP`` px of arc along polylines ``(B, V, 2)`` of equal pieces ``seg``."""
    t = np.arange(0.0, seg, _STEP) / seg
    a, b = vertices[:, :-1, None], vertices[:, 1:, None]
    pts = (a + (b - a) * t[None, None, :, None]).reshape(len(vertices), -1, 2)
    return np.concatenate([pts, vertices[:, -1:]], 1)


def _dash_keep(n_points: int, dash: float, gap: float) -> np.ndarray:
    """Which dense points lie on a dash (arc length modulo dash + gap)."""
    s = np.arange(n_points) * _STEP
    return np.ones(n_points, bool) if gap == 0 else (s % (dash + gap)) < dash


def render_paths(cfg: PathfinderConfig, paths: list[np.ndarray], markers: np.ndarray) -> np.ndarray:
    """Draw dashed ``paths`` (dense (N, 2) (y, x) points) and round ``markers`` (M, 2).

    Returns:
        ``(S, S)`` uint8 image, 255 on paths and markers, 0 elsewhere.
    """
    canvas = np.zeros((cfg.image_size, cfg.image_size), bool)
    line = _disc((cfg.px(cfg.line_width) - 1) / 2)
    dash, gap = cfg.px(cfg.dash_length), cfg.px(cfg.gap_length, 0)
    for pts in paths:
        keep = _dash_keep(len(pts), dash, gap)
        _stamp(canvas, np.rint(pts[keep]).astype(np.int64), line)
    markers = np.rint(np.asarray(markers)).astype(np.int64).reshape(-1, 2)
    _stamp(canvas, markers, _disc(cfg.px(cfg.marker_radius)))
    return canvas.astype(np.uint8) * 255


def _walk(
    start: np.ndarray,
    heading: np.ndarray,
    turns: np.ndarray,
    seg: float,
    low: float,
    high: float,
    max_turn: float,
) -> np.ndarray:
    """Vertices ``(B, T + 1, 2)`` of curved walks; a step that would leave ``[low, high]^2``
    turns towards the centre instead (by at most ``max_turn``), so long paths fit."""
    centre = (low + high) / 2
    vertices = [start]
    for turn in turns:
        nxt = vertices[-1] + seg * np.stack([np.sin(heading + turn), np.cos(heading + turn)], -1)
        out = ((nxt < low + seg) | (nxt > high - seg)).any(-1)
        home = np.arctan2(*(centre - vertices[-1]).T)
        inward = np.clip((home - heading + math.pi) % (2 * math.pi) - math.pi, -max_turn, max_turn)
        heading = heading + np.where(out, inward, turn)
        vertices.append(vertices[-1] + seg * np.stack([np.sin(heading), np.cos(heading)], -1))
    return np.stack(vertices, 1)


def _place_path(
    cfg: PathfinderConfig, rng: np.random.Generator, length: float, taken: np.ndarray
) -> np.ndarray | None:
    """A random curved path (dense (y, x) points) clear of ``taken``, or None after some tries."""
    s = cfg.image_size
    seg = cfg.segment_length * s
    n_seg = max(1, round(length * s / seg))
    margin = cfg.px(cfg.marker_radius) + 1
    half = (cfg.px(cfg.line_width) - 1) // 2 + 1
    sep = cfg.px(cfg.separation, 0)
    near_line = _dilate(taken, max(sep - 1, 0) + half)
    near_end = _dilate(taken, max(sep - 1, 0) + cfg.px(cfg.marker_radius))
    for _ in range(8):
        start = rng.uniform(margin, s - 1 - margin, size=(_BATCH, 2))
        heading = rng.uniform(0, 2 * math.pi, size=_BATCH)
        turns = rng.uniform(-cfg.max_turn, cfg.max_turn, size=(n_seg, _BATCH))
        pts = _dense(_walk(start, heading, turns, seg, margin, s - 1 - margin, cfg.max_turn), seg)
        inside = ((pts >= margin) & (pts <= s - 1 - margin)).all((1, 2))
        yx = np.clip(np.rint(pts).astype(np.int64), 0, s - 1)
        clear = ~near_line[yx[..., 0], yx[..., 1]].any(1)
        ends = yx[:, [0, -1]]
        clear &= ~near_end[ends[..., 0], ends[..., 1]].any(1)
        ok = np.flatnonzero(inside & clear)
        if len(ok):
            return pts[ok[0]]
    return None


def pathfinder_sample(
    cfg: PathfinderConfig, rng: np.random.Generator, label: int
) -> tuple[np.ndarray, int, dict[str, Any]]:
    """Draw one pathfinder image with the given label.

    Args:
        cfg: generator config.
        rng: the sample's own generator (seeded from (seed, index) by the caller).
        label: 1 for markers joined by one path, 0 for markers on two different paths.

    Returns:
        ``(image (S, S) uint8, label, meta)``; meta holds the marker centres (x, y).
    """
    if label not in (0, 1):
        raise ValueError(f"pathfinder: label={label!r} is invalid, expected 0 or 1")
    s = cfg.image_size
    distractor = cfg.distractor_length or cfg.path_length
    lengths = [cfg.path_length] * 2 + [distractor] * cfg.num_distractors
    line = _disc((cfg.px(cfg.line_width) - 1) / 2)
    end = _disc(cfg.px(cfg.marker_radius))
    for _ in range(50):
        taken = np.zeros((s, s), bool)
        paths: list[np.ndarray] = []
        for length in lengths:
            pts = _place_path(cfg, rng, length, taken)
            if pts is None:
                break
            paths.append(pts)
            _stamp(taken, np.rint(pts).astype(np.int64), line)
            _stamp(taken, np.rint(pts[[0, -1]]).astype(np.int64), end)
        else:
            markers = [paths[0][0], paths[0][-1] if label == 1 else paths[1][-1]]
            image = render_paths(cfg, paths, np.stack(markers))
            return image, label, {"markers": np.round(np.stack(markers)[:, ::-1], 2).tolist()}
    raise ValueError(
        f"pathfinder: could not place {len(lengths)} paths of length {cfg.path_length} in "
        f"{s}x{s} px; lower path_length, num_distractors or separation"
    )
