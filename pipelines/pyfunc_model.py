"""The MLflow pyfunc of a gattn model folder, logged as *models from code*.

MLflow copies this file into every registered model and runs it on load (no pickled object is
stored): :meth:`GattnPyfunc.load_context` rebuilds the network from the folder's
``config.json`` and loads its ``model.safetensors`` with :func:`gattn.models.load_model`.
Loading needs the ``gattn`` package importable (this project's environment).

``predict`` takes float32 images ``(B, C, H, W)`` as a numpy array and returns the logits:
``(B, K, H, W)`` for a segmenter, ``(B, K)`` for a classifier.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc.model import PythonModel

MODEL_ARTIFACT = "model"  # key of the model folder in the pyfunc's ``artifacts``


class GattnPyfunc(PythonModel):
    """A gattn model folder served through ``mlflow.pyfunc``."""

    def load_context(self, context: Any) -> None:
        from gattn.models import load_model

        self.model, self.config = load_model(context.artifacts[MODEL_ARTIFACT])

    def predict(self, context: Any, model_input: np.ndarray, params: Any = None) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.ascontiguousarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return self.model(x).float().numpy()


mlflow.models.set_model(GattnPyfunc())
