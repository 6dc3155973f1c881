"""The weights a stage starts a model from: ``finetune.init`` and each tune family's ``init``.

- ``scratch``: the builder's initialisation;
- ``ssl``: the pretrain stage's encoder (``models/pretrained``), loaded only into the backbone
  it was pretrained as (same name and arguments), so any other backbone starts from scratch;
- ``hub``: timm's pretrained weights of the model's backbone (``timm.create_model(backbone,
  pretrained=True)``: the Hugging Face Hub, or its local cache);
- a weights file (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)``), or a named file that a package ships
  (:data:`gattn.models.weight_files.WEIGHT_FILES`, e.g. ``mobilenetv2_100.tv_in1k``:
  torchvision's ImageNet MobileNetV2, offline); another library's layout is renamed to timm's
  (:mod:`gattn.models.converters`).

Every source goes through the one loader (:func:`gattn.models.pretrained.load_pretrained`:
by name and shape, a classifier for other classes left out and reported), so a search trial
and the fine-tuning of its config start alike. ``finetune.init: trial`` (the searched trial's
own weights, every tensor) is the finetune stage's own and not handled here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from gattn.models.pretrained import (
    ENCODER_WEIGHTS,
    LoadReport,
    load_pretrained,
    read_encoder,
    weights_from,
)
from gattn.models.weight_files import WEIGHT_FILES, sha256, weight_file
from pipelines.config import INIT_SOURCES

InitKind = Literal["scratch", "ssl", "hub", "file"]


def init_kind(init: str) -> InitKind:
    """What an ``init`` setting names: one of :data:`pipelines.config.INIT_SOURCES`, or
    ``"file"`` (a path or a named file)."""
    if init in INIT_SOURCES:
        return init  # type: ignore[return-value]
    return "file"


def init_file(init: str) -> Path:
    """The weights file of a ``file`` init: a named file's path (sha256 checked) or the path
    given, made absolute.

    Raises:
        FileNotFoundError: no such file, or the package of a named file is not installed.
        KeyError: an unknown name that is not a path either.
    """
    if init in WEIGHT_FILES:
        return weight_file(init)
    path = Path(init).expanduser()
    if not path.is_file():
        named = ", ".join(sorted(WEIGHT_FILES))
        raise FileNotFoundError(
            f"init {init!r}: no such weights file; give a .safetensors/.pth path or a named "
            f"weights file ({named}), or one of {', '.join(INIT_SOURCES)}"
        )
    return path.resolve()


@dataclass(frozen=True)
class InitWeights:
    """An ``init`` setting resolved to what :func:`load_pretrained` takes.

    Attributes:
        init: The setting.
        weights: The state dict, or ``None``: from scratch.
        source_cfg: For ``ssl``, the encoder's build config: nothing is loaded into another
            backbone (:func:`gattn.models.pretrained.same_backbone`); else ``None``.
        note: Why there are no weights (``None`` weights), for the report.
    """

    init: str
    weights: dict[str, torch.Tensor] | None
    source_cfg: dict[str, Any] | None = None
    note: str = ""


def resolve_init(
    init: str, backbone: str, encoder: Path | None, *, require_encoder: bool
) -> InitWeights:
    """Read the weights ``init`` names for a model on ``backbone``.

    Args:
        init: ``scratch``, ``ssl``, ``hub``, a weights file or a named file.
        backbone: The target's timm model (``hub`` fetches its weights).
        encoder: The pretrain stage's folder (``ssl``).
        require_encoder: ``ssl`` without an encoder is an error (else: from scratch, noted).

    Raises:
        FileNotFoundError: a missing file, package or (``require_encoder``) encoder.
        gattn.models.pretrained.HubUnavailableError: ``hub`` offline, not cached.
    """
    kind = init_kind(init)
    if kind == "scratch":
        return InitWeights(init, None, note="from scratch")
    if kind == "ssl":
        found = read_encoder(encoder) if encoder is not None else None
        if found is None:
            where = Path(encoder or "models/pretrained") / ENCODER_WEIGHTS
            if require_encoder:
                raise FileNotFoundError(
                    f"{where}: not found (init: ssl, the pretrain stage's encoder); run "
                    "`gattn pretrain` or set init: scratch, hub or a weights file"
                )
            return InitWeights(init, None, note=f"no pretrained encoder ({where}): from scratch")
        source_cfg, weights = found
        return InitWeights(init, weights, source_cfg)
    if kind == "hub":
        return InitWeights(init, weights_from("hub", backbone))
    return InitWeights(init, weights_from(str(init_file(init)), backbone))


def apply_init(model: nn.Module, cfg: Mapping[str, Any], initial: InitWeights) -> LoadReport:
    """Load ``initial`` into ``model`` (built from ``cfg``) by name and shape, in place."""
    if initial.weights is None:
        return LoadReport(missing=list(model.state_dict()), skipped=initial.note)
    return load_pretrained(
        model,
        initial.weights,
        source_cfg=initial.source_cfg,
        target_cfg=cfg if initial.source_cfg is not None else None,
    )


def state_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A sha256 of a state dict's names, dtypes, shapes and values (for weights that have no
    file of ours, e.g. timm's from the hub)."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def init_fingerprint(init: str, backbone: str, encoder: Path | None) -> str:
    """What identifies the weights ``init`` starts from, for a run's name: ``scratch``, the
    sha256 of the encoder or weights file, or of timm's weights (``hub``, fetched here, so an
    offline machine fails before any training starts).

    Raises:
        As :func:`resolve_init` with ``require_encoder=True``.
    """
    kind = init_kind(init)
    if kind == "scratch":
        return "scratch"
    if kind == "ssl":
        path = Path(encoder or "models/pretrained") / ENCODER_WEIGHTS
        if not path.is_file():
            resolve_init(init, backbone, encoder, require_encoder=True)  # raises, clearly
        return sha256(path)
    if kind == "hub":
        return f"hub-{backbone}-{state_fingerprint(weights_from('hub', backbone))}"
    return f"file-{sha256(init_file(init))}"
