"""A detector seen as the dense or per-class scores that Grad-CAM and the ERF explain.

Grad-CAM (Selvaraju et al. 2017) needs one scalar per image and class; a detector answers with
boxes. :class:`DetectionScores` gives, for each class ``k``, the class-``k`` logit at the
location of the highest-scoring class-``k`` detection: the FCOS location (any level) whose
score ``sqrt(sigmoid(cls_k) * sigmoid(centerness))`` is largest, which is the location of the
top class-``k`` box before NMS, and so of the top class-``k`` box after it. Explaining the
top detection is then Grad-CAM of this module at its label. The location is picked without
gradient; the gradient flows through that one logit.

The effective receptive field (Luo et al. 2016) of a detector is that of its finest level's
class logits (:class:`FinestClassMap`, stride 4 on P2, 8 on P3): the map its small objects are
found on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # gattn.diagnostics stays light: the prepare stage draws with it
    from gattn.models.detector import Detector


class DetectionScores(nn.Module):
    """``(B, K)`` scores of a :class:`~gattn.models.detector.Detector` for Grad-CAM: per class,
    its logit at its top detection's location (see the module docstring).

    Args:
        detector: The detector, in eval mode.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from gattn.models.fcos import flatten_levels

        out = self.detector(x)
        logits = flatten_levels(out.cls_logits)  # (B, N, K)
        with torch.no_grad():
            ctr = flatten_levels(out.centerness).sigmoid()  # (B, N, 1)
            where = (logits.sigmoid() * ctr).argmax(dim=1)  # (B, K): sqrt is monotone
        return logits.gather(1, where[:, None, :])[:, 0]


def top_class(detector: Detector, x: torch.Tensor) -> int:
    """The label of the highest-scoring detection of one image ``(1, C, H, W)`` (there is
    always one: no score threshold)."""
    (found,) = detector.predict(x, score_thresh=0.0, max_det=1)
    return int(found["labels"][0])


class FinestClassMap(nn.Module):
    """The detector as a ``(B, K, h, w)`` map for the ERF: its finest level's class logits.

    Args:
        detector: The detector, in eval mode.
    """

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.detector(x).cls_logits[0]
