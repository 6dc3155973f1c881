"""Saving and loading models as data: weights in safetensors plus a JSON config that rebuilds
the module with :func:`~gattn.models.build_model`. Nothing is unpickled, so a model folder from
anywhere is safe to load.

A model folder holds ``model.safetensors`` and ``config.json``::

    {"model": {...build_model config...}, "classes": [...], "img_size": 64, ...}

Any further keys in ``config.json`` (``classes``, ``img_size``, the run that made it) are
metadata for the caller and returned as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .build import build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model``'s state: contiguous tensors with their own storage,
    as safetensors requires (tied weights are cloned apart)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_model(model: nn.Module, model_cfg: Mapping[str, Any], out_dir: Path, **meta: Any) -> Path:
    """Write ``model``'s weights and the config that rebuilds it into ``out_dir``.

    Args:
        model: The module; its ``state_dict`` is saved (tensors made contiguous, shared
            storage cloned, as safetensors requires).
        model_cfg: The :func:`build_model` config ``model`` was built from.
        out_dir: The model folder (created); each file is written atomically.
        **meta: JSON-serialisable metadata stored beside the config (e.g. ``classes``).

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = cpu_state_dict(model)
    tmp = out_dir / f".{WEIGHTS}.tmp"
    save_file(state, str(tmp))
    os.replace(tmp, out_dir / WEIGHTS)
    cfg_tmp = out_dir / f".{CONFIG}.tmp"
    cfg_tmp.write_text(json.dumps({"model": dict(model_cfg), **meta}, indent=2) + "\n")
    os.replace(cfg_tmp, out_dir / CONFIG)
    return out_dir


def read_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a model folder, with a clear error when the folder is not one."""
    path = Path(model_dir) / CONFIG
    if not path.is_file() or not (Path(model_dir) / WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{model_dir}: not a model folder (expected {CONFIG} and {WEIGHTS}, as written by "
            "gattn.models.save_model / the finetune stage)"
        )
    cfg = json.loads(path.read_text())
    if not isinstance(cfg.get("model"), dict):
        raise ValueError(f"{path}: missing the 'model' entry (a build_model config)")
    return cfg


def load_model(model_dir: Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model folder written by :func:`save_model`.

    Returns:
        ``(model in eval mode, config dict)``.

    Raises:
        FileNotFoundError: the folder lacks ``config.json`` or ``model.safetensors``.
        RuntimeError: the weights do not match the config (missing or unexpected keys).
    """
    cfg = read_config(model_dir)
    model = build_model(cfg["model"])
    model.load_state_dict(load_file(str(Path(model_dir) / WEIGHTS), device=device))
    return model.to(device).eval(), cfg
