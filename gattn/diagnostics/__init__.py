"""Diagnostics: what a model looks at and how far it sees, as numbers and pictures."""

from .plots import colorize_mask, sample_grid, save_figure

__all__ = ["colorize_mask", "sample_grid", "save_figure"]
