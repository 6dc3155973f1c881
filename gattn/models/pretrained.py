"""Load a pretrained encoder's weights into a model built for another task, by name and shape.

Transfer as in MAE/BEiT fine-tuning (He et al. 2022, "Masked Autoencoders Are Scalable Vision
Learners", Sec. 4): every tensor of the encoder whose name and shape match a tensor of the
target is copied, the rest of the target (decode heads, injected blocks, a classifier for
other classes) keeps its initialisation, and an absolute position embedding trained on
another grid is resampled (timm's ``resample_abs_pos_embed``). The one loader used wherever
weights are transferred, so a search trial and the fine-tuning of the same config start from
the same weights.

Names are compared after removing what wraps the encoder in the target: the prefix of the
encoder inside the model (e.g. ``encoder.model.`` of a
:class:`~gattn.models.Segmenter` over a ``features_only`` backbone) and the ``.stage.`` level
that :func:`~gattn.models.inject` adds around a stage that received blocks
(:class:`~gattn.models.stages.InjectedStage`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from .stages import InjectedStage

__all__ = ["ENCODER_WEIGHTS", "LoadReport", "load_pretrained", "read_encoder", "same_backbone"]

ENCODER_WEIGHTS = "encoder.safetensors"  # with config.json ({"model": cfg}): a pretrained encoder


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        prefix: Where the encoder sits in the target's (unwrapped) names, e.g.
            ``"encoder.model."``.
        matched: Target tensors loaded.
        missing: Target tensors left as initialised.
        unexpected: Pretrained tensors not used.
        shape_mismatch: ``{target name: [pretrained shape, target shape]}`` skipped.
        resampled: Position embeddings resampled to the target's grid.
        skipped: Why nothing was loaded (another backbone), or ``""``.
    """

    prefix: str = ""
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, list[list[int]]] = field(default_factory=dict)
    resampled: list[str] = field(default_factory=list)
    skipped: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def same_backbone(source: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    """Whether two :func:`~gattn.models.build_model` configs name the same backbone (name and
    ``backbone_kwargs``); weights are only transferred between the same architecture."""
    return source.get("backbone") == target.get("backbone") and dict(
        source.get("backbone_kwargs") or {}
    ) == dict(target.get("backbone_kwargs") or {})


def _unwrapped_names(model: nn.Module) -> dict[str, str]:
    """``{name without InjectedStage's ".stage." level: state_dict name}``."""
    wrappers = [n for n, m in model.named_modules() if isinstance(m, InjectedStage)]
    out = {}
    for name in model.state_dict():
        plain = name
        for w in wrappers:
            head = f"{w}.stage."
            if plain.startswith(head):
                plain = f"{w}.{plain[len(head) :]}"
        out[plain] = name
    return out


def _prefix(target: list[str], source: set[str]) -> str:
    """The prefix ``p`` for which the most target names are ``p + a source name``."""
    counts: dict[str, int] = {}
    for name in target:
        parts = name.split(".")
        for i in range(len(parts)):
            if ".".join(parts[i:]) in source:
                prefix = ".".join(parts[:i]) + ("." if i else "")
                counts[prefix] = counts.get(prefix, 0) + 1
    return max(counts, key=lambda p: (counts[p], -len(p))) if counts else ""


def _resample(model: nn.Module, name: str, src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """An absolute position embedding ``src`` resampled to the grid of ``shape``, or ``src``."""
    if not name.endswith("pos_embed") or src.ndim != 3 or src.shape[-1] != shape[-1]:
        return src
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    prefix = (
        0 if getattr(owner, "no_embed_class", False) else getattr(owner, "num_prefix_tokens", 0)
    )
    side, src_side = math.isqrt(shape[1] - prefix), math.isqrt(src.shape[1] - prefix)
    if side * side != shape[1] - prefix or src_side * src_side != src.shape[1] - prefix:
        return src
    return resample_abs_pos_embed(src, (side, side), (src_side, src_side), prefix)


def load_pretrained(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    *,
    source_cfg: Mapping[str, Any] | None = None,
    target_cfg: Mapping[str, Any] | None = None,
) -> LoadReport:
    """Copy ``weights`` into ``model`` where names (unwrapped, up to a common prefix) and
    shapes match, in place.

    Args:
        model: The target, e.g. a segmenter or classifier with injected blocks.
        weights: The pretrained encoder's state dict.
        source_cfg: The config the weights were trained with; with ``target_cfg``, nothing is
            loaded unless both name the same backbone (:func:`same_backbone`).
        target_cfg: ``model``'s config.

    Returns:
        The :class:`LoadReport`.
    """
    state = model.state_dict()
    if (
        source_cfg is not None
        and target_cfg is not None
        and not same_backbone(source_cfg, target_cfg)
    ):
        return LoadReport(
            missing=list(state),
            unexpected=sorted(weights),
            skipped=f"backbone {target_cfg.get('backbone')!r} is not the pretrained "
            f"{source_cfg.get('backbone')!r} (or its arguments differ)",
        )
    names = _unwrapped_names(model)
    prefix = _prefix(list(names), set(weights))
    report = LoadReport(prefix=prefix)
    used = set()
    for plain, name in names.items():
        src_name = plain[len(prefix) :]
        if not plain.startswith(prefix) or src_name not in weights:
            continue
        used.add(src_name)
        src, tensor = weights[src_name], state[name]
        if src.shape != tensor.shape:
            src = _resample(model, name, src, tensor.shape)
            if src.shape != tensor.shape:
                report.shape_mismatch[name] = [list(weights[src_name].shape), list(tensor.shape)]
                continue
            report.resampled.append(name)
        state[name] = src.to(tensor.dtype)
        report.matched.append(name)
    model.load_state_dict(state)
    loaded = set(report.matched) | set(report.shape_mismatch)
    report.missing = [n for n in state if n not in loaded]
    report.unexpected = sorted(set(weights) - used)
    return report


def read_encoder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """The ``(config, weights)`` of a pretrained encoder folder (``encoder.safetensors`` and a
    ``config.json`` whose ``model`` entry rebuilds it), or ``None`` when there is none."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / ENCODER_WEIGHTS).is_file():
        return None
    cfg = json.loads((folder / "config.json").read_text())["model"]
    return cfg, load_file(str(folder / ENCODER_WEIGHTS))
