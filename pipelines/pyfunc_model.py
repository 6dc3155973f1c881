"""The MLflow pyfunc of a gattn model folder, logged as *models from code*.

MLflow copies this file into every registered model and runs it on load (no pickled object is
stored): :meth:`GattnPyfunc.load_context` rebuilds the network from the folder's
``config.json`` and loads its ``model.safetensors`` with :func:`gattn.models.load_model`.
Loading needs the ``gattn`` package importable (this project's environment).

``predict`` takes float32 images ``(B, C, H, W)`` as a numpy array and returns the logits:
``(B, K, H, W)`` for a segmenter, ``(B, K)`` for a classifier; for a detector the detections,
``(B, MAX_DETECTIONS, 6)`` rows ``(x0, y0, x1, y1, score, label)`` in input pixels by score,
padded with rows of zeros and label -1 (a fixed shape, as MLflow's tensor signature needs).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc.model import PythonModel

MODEL_ARTIFACT = "model"  # key of the model folder in the pyfunc's ``artifacts``
MAX_DETECTIONS = 100  # rows per image of a detector's output


class GattnPyfunc(PythonModel):
    """A gattn model folder served through ``mlflow.pyfunc``."""

    def load_context(self, context: Any) -> None:
        from gattn.models import load_model

        self.model, self.config = load_model(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        import torch

        from gattn.models import Detector

        x = torch.as_tensor(np.ascontiguousarray(model_input, dtype=np.float32))
        with torch.no_grad():
            if not isinstance(self.model, Detector):
                return self.model(x).float().numpy()
            out = np.zeros((len(x), MAX_DETECTIONS, 6), np.float32)
            out[..., 5] = -1
            for i, p in enumerate(self.model.predict(x, max_det=MAX_DETECTIONS)):
                n = len(p["scores"])
                out[i, :n, :4] = p["boxes"].float().numpy()
                out[i, :n, 4] = p["scores"].float().numpy()
                out[i, :n, 5] = p["labels"].numpy()
            return out


mlflow.models.set_model(GattnPyfunc())
