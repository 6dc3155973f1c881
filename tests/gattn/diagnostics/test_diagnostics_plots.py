"""Confusion-matrix figure: a PNG for a valid matrix, a clear error otherwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gattn.diagnostics import confusion_matrix


def test_confusion_matrix_png(tmp_path: Path) -> None:
    counts = np.array([[50, 2, 0], [3, 10, 1], [0, 0, 0]])  # an absent class: no division by 0
    path = confusion_matrix(counts, ["bg", "a", "b"], tmp_path / "cm.png", title="test")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind


def test_confusion_matrix_rejects_mismatched_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="square matrix and 2 names"):
        confusion_matrix(np.zeros((2, 2)), ["only one"], tmp_path / "cm.png")
    with pytest.raises(ValueError, match="square"):
        confusion_matrix(np.zeros((2, 3)), ["a", "b"], tmp_path / "cm.png")
