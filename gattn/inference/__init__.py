"""Inference at full resolution: sliding windows with global feedback, test-time augmentation
(for dense maps and for boxes), and the one preprocessing path from an image to a model's
input."""

from .detection import BoxRunner, resized_detect, sliding_window_detect, tta_detect
from .preprocess import InputTransform, model_input, resize_input
from .sliding_window import blend_weights, downscaled_context, sliding_window, window_starts
from .tta import tta

__all__ = [
    "BoxRunner",
    "InputTransform",
    "blend_weights",
    "downscaled_context",
    "model_input",
    "resize_input",
    "resized_detect",
    "sliding_window",
    "sliding_window_detect",
    "tta",
    "tta_detect",
    "window_starts",
]
