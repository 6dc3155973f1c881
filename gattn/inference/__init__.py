"""Inference at full resolution: sliding windows with global feedback, test-time augmentation."""

from .sliding_window import blend_weights, downscaled_context, sliding_window, window_starts
from .tta import tta

__all__ = ["blend_weights", "downscaled_context", "sliding_window", "tta", "window_starts"]
