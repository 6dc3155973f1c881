"""Load pretrained weights into a model built for another task, by name and shape.

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
(:class:`~gattn.models.stages.InjectedStage`). Weights in another library's layout (e.g.
torchvision's MobileNetV2) are first renamed to timm's by their registered converter
(:mod:`gattn.models.converters`, recognised from the names).

Where weights come from (:func:`weights_from`): a self-supervised encoder folder
(:func:`read_encoder`), a file (:func:`read_weights`: safetensors, or a ``torch.save`` file
read with ``weights_only=True``, so no pickled object is ever run), a named file that a package
ships (:mod:`gattn.models.weight_files`, e.g. ImageNet MobileNetV2 offline), or timm's
pretrained weights from the Hugging Face Hub (:func:`hub_weights`, ``pretrained=True``).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from .build import create_backbone
from .converters import convert_state_dict, detect_layout
from .recipes import resolve_recipe
from .stages import InjectedStage
from .weight_files import WEIGHT_FILES, weight_file

__all__ = [
    "ENCODER_WEIGHTS",
    "WEIGHT_SUFFIXES",
    "HubUnavailableError",
    "LoadReport",
    "hub_weights",
    "load_pretrained",
    "read_encoder",
    "read_weights",
    "same_backbone",
    "weights_from",
]

ENCODER_WEIGHTS = "encoder.safetensors"  # with config.json ({"model": cfg}): a pretrained encoder
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # files read_weights reads
_CHECKPOINT_KEYS = ("state_dict", "model", "module")  # where training checkpoints keep weights


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
        layout: The converter the weights went through
            (:data:`gattn.models.converters.CONVERTERS`), or ``""``: timm's names.
    """

    prefix: str = ""
    matched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatch: dict[str, list[list[int]]] = field(default_factory=dict)
    resampled: list[str] = field(default_factory=list)
    skipped: str = ""
    layout: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# timm arguments that change how a model runs, not its parameters (DINO's ViT is built with
# dynamic_img_size for its local crops; the ViT fine-tuned from it need not be).
WEIGHTLESS_KWARGS = frozenset(
    {"dynamic_img_size", "dynamic_img_pad", "drop_rate", "drop_path_rate", "attn_drop_rate",
     "proj_drop_rate", "pos_drop_rate", "patch_drop_rate"}
)  # fmt: skip


def same_backbone(source: Mapping[str, Any], target: Mapping[str, Any]) -> bool:
    """Whether two :func:`~gattn.models.build_model` configs name the same backbone (name and
    ``backbone_kwargs``, less :data:`WEIGHTLESS_KWARGS`); weights are only transferred between
    the same architecture. A detector recipe's config names its recipe's backbone
    (:func:`~gattn.models.recipes.resolve_recipe`)."""
    source, target = resolve_recipe(source), resolve_recipe(target)

    def weighted(cfg: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = cfg.get("backbone_kwargs") or {}
        return {k: v for k, v in kwargs.items() if k not in WEIGHTLESS_KWARGS}

    return source.get("backbone") == target.get("backbone") and weighted(source) == weighted(target)


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
    layout: str | None = "auto",
) -> LoadReport:
    """Copy ``weights`` into ``model`` where names (unwrapped, up to a common prefix) and
    shapes match, in place.

    Args:
        model: The target, e.g. a segmenter or classifier with injected blocks.
        weights: The pretrained state dict (an encoder's, or a whole classifier's: its
            classifier for other classes is reported as shape-mismatched, not loaded).
        source_cfg: The config the weights were trained with; with ``target_cfg``, nothing is
            loaded unless both name the same backbone (:func:`same_backbone`).
        target_cfg: ``model``'s config.
        layout: The layout of ``weights``' names: ``"auto"`` (recognised by
            :func:`gattn.models.converters.detect_layout`), a registered converter's name, or
            ``None`` (timm's names).

    Returns:
        The :class:`LoadReport`.
    """
    if layout == "auto":
        layout = detect_layout(list(weights))
    weights = convert_state_dict(weights, layout)
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
            layout=layout or "",
        )
    names = _unwrapped_names(model)
    prefix = _prefix(list(names), set(weights))
    report = LoadReport(prefix=prefix, layout=layout or "")
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


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights file, on the CPU.

    ``.safetensors`` is read as it is; ``.pth``/``.pt``/``.bin`` (``torch.save``) with
    ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only, so a
    file that holds any other object is refused rather than run. A training checkpoint that
    keeps the weights under ``state_dict``, ``model`` or ``module`` is unwrapped.

    Raises:
        FileNotFoundError: no such file.
        ValueError: another suffix, a pickle with other objects, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(
            f"{path}: not a weights file; expected one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused: it holds Python objects other than tensors, which "
            "torch.load(weights_only=True) does not unpickle (loading them could run any "
            "code). Save the model's state_dict() alone, or as .safetensors "
            f"({_first_line(err)})"
        ) from None
    if isinstance(data, Mapping) and not all(isinstance(v, torch.Tensor) for v in data.values()):
        inner = [data[k] for k in _CHECKPOINT_KEYS if isinstance(data.get(k), Mapping)]
        data = inner[0] if inner else data
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{path}: holds no state dict (got {type(data).__name__})")
    others = sorted(k for k, v in data.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f"{path}: entries that are not tensors: {others[:5]}")
    return {str(k): v for k, v in data.items()}


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [""])[0]


class HubUnavailableError(RuntimeError):
    """timm's pretrained weights could not be fetched (no network, no local cache)."""


def _is_network_error(err: BaseException) -> bool:
    root = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or root in {"huggingface_hub", "requests", "urllib3", "httpx"}


def hub_weights(backbone: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``backbone`` (``timm.create_model(backbone,
    pretrained=True)``, its default tag, from the Hugging Face Hub or its local cache).

    Raises:
        HubUnavailableError: they cannot be fetched here (offline and not cached); the
            message names the fixes.
        ValueError: ``backbone`` is not a timm model, or has no pretrained weights.
    """
    try:
        model = create_backbone(backbone, pretrained=True)
    except Exception as err:
        if not _is_network_error(err):
            raise
        named = [n for n, f in WEIGHT_FILES.items() if f.backbone == backbone]
        offline = f"a named weights file ({', '.join(named)}) or " if named else ""
        raise HubUnavailableError(
            f"init hub: cannot fetch timm's pretrained weights of {backbone!r} "
            f"({type(err).__name__}: {_first_line(err)}). This "
            "machine is offline or cannot reach the Hugging Face Hub, and the weights are not "
            "in its cache ($HF_HOME). Fix: fetch them once where there is a network (any "
            f"`timm.create_model({backbone!r}, pretrained=True)`; set HF_HUB_OFFLINE=1 to use "
            f"the cache without retries), or start from {offline}a local weights file "
            "(init: path/to/weights.safetensors or .pth), or init: scratch"
        ) from err
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def weights_from(source: str, backbone: str) -> dict[str, torch.Tensor]:
    """The weights ``source`` names, for a model built on ``backbone``.

    Args:
        source: ``"hub"`` (:func:`hub_weights` of ``backbone``), a named file
            (:data:`gattn.models.weight_files.WEIGHT_FILES`), or a path to a weights file
            (:func:`read_weights`).
        backbone: The target's timm model name (used by ``"hub"``).

    Raises:
        FileNotFoundError, ValueError, HubUnavailableError: as the reader raises them.
    """
    if source == "hub":
        return hub_weights(backbone)
    if source in WEIGHT_FILES:
        return read_weights(weight_file(source))
    return read_weights(Path(source))
