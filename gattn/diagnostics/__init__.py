"""Diagnostics: what a model looks at and how far it sees, as numbers and pictures.

A detector's Grad-CAM targets live in :mod:`gattn.diagnostics.detection`, imported from there:
they need :mod:`gattn.models`, which the drawing helpers here (used by the data stage) do not.
"""

from .erf import ReceptiveField, area_ratios, effective_receptive_field
from .grad_cam import grad_cam
from .plots import (
    colorize_mask,
    confusion_matrix,
    draw_boxes,
    heatmap,
    overlay_heatmap,
    sample_grid,
    save_figure,
)
from .rollout import attention_rollout, capture_attention, rollout, rollout_map

__all__ = [
    "ReceptiveField",
    "area_ratios",
    "attention_rollout",
    "capture_attention",
    "colorize_mask",
    "confusion_matrix",
    "draw_boxes",
    "effective_receptive_field",
    "grad_cam",
    "heatmap",
    "overlay_heatmap",
    "rollout",
    "rollout_map",
    "sample_grid",
    "save_figure",
]
