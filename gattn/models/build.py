"""Build a classifier or a segmenter from a plain dict (the ``model`` section of params.yaml).

Keyword-only builders, chosen by data (torchvision style): ``task`` picks a builder in
:data:`TASKS`, ``head`` a class in :data:`~gattn.models.heads.HEADS`, ``backbone`` any timm
model name including this project's ``gattn_*`` recipes, and ``inject`` is a spec for
:func:`~gattn.models.inject` (He et al. 2016, "Deep Residual Learning for Image Recognition",
and the other backbones are timm's). Example::

    build_model({"task": "seg", "backbone": "resnet18", "num_classes": 3, "img_size": 64,
                 "inject": "nonlocal@3", "head": "psp", "head_channels": 64, "dropout": 0.1})

Keys that only one task uses (``head``, ``head_channels``, ``head_kwargs``) are ignored by the
other, so one dict can serve pretraining (classification) and fine-tuning (segmentation).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import timm
from torch import nn

from .heads import HEADS
from .inject import Spec
from .inject import inject as inject_blocks
from .segmenter import Segmenter, last_feature_channels


def create_backbone(
    name: str, *, pretrained: bool = False, img_size: int | None = None, **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with a checked name and ``img_size`` only where it is taken.

    Args:
        name: A timm model name (``timm.list_models()``), e.g. ``"resnet18"`` or a recipe.
        pretrained: Load timm's pretrained weights (needs them available offline).
        img_size: Input size for models with a fixed grid (ViT, Swin); fully convolutional
            models, which take any size, ignore it.
        **kwargs: Further ``timm.create_model`` arguments.

    Raises:
        ValueError: ``name`` is not a timm model (the message suggests close names and lists
            the ``gattn_*`` recipes).
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ValueError(
            f"unknown backbone {name!r}; did you mean {close or 'none'}? gattn recipes: "
            f"{', '.join(timm.list_models('gattn_*'))}; or any timm.list_models() name"
        )
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=pretrained, img_size=img_size, **kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def build_classifier(
    *,
    backbone: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    inject: Spec = None,
    dropout: float = 0.0,
    pretrained: bool = False,
    backbone_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """A timm classifier ``(B, in_chans, H, W) -> (B, num_classes)`` with injected blocks.

    Args:
        backbone: timm model name.
        num_classes: Classes.
        in_chans: Input channels.
        img_size: Input size (see :func:`create_backbone`).
        inject: Injection spec, e.g. ``"nonlocal@3"``.
        dropout: Dropout before the classifier (timm ``drop_rate``).
        pretrained: Load timm's pretrained weights.
        backbone_kwargs: Further ``timm.create_model`` arguments.
    """
    model = create_backbone(
        backbone,
        pretrained=pretrained,
        img_size=img_size,
        num_classes=num_classes,
        in_chans=in_chans,
        drop_rate=dropout,
        **dict(backbone_kwargs or {}),
    )
    return inject_blocks(model, inject)


def build_segmenter(
    *,
    backbone: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    inject: Spec = None,
    head: str = "fcn",
    head_channels: int = 64,
    dropout: float = 0.1,
    pretrained: bool = False,
    backbone_kwargs: Mapping[str, Any] | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
) -> Segmenter:
    """A :class:`Segmenter`: the backbone's last feature map and a decode head.

    Args:
        backbone, num_classes, in_chans, img_size, inject, pretrained, backbone_kwargs: As in
            :func:`build_classifier` (the backbone is built with ``features_only=True``).
        head: Head name, a key of :data:`~gattn.models.heads.HEADS`.
        head_channels: Width of the head's features.
        dropout: Dropout before the head's classifier.
        head_kwargs: Further head arguments (e.g. ``pool_sizes``, ``rates``).

    The head takes a ``global_context`` as wide as the encoder's last map
    (:meth:`Segmenter.encode_context`).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; valid heads: {', '.join(HEADS)}")
    encoder = create_backbone(
        backbone,
        pretrained=pretrained,
        img_size=img_size,
        features_only=True,
        out_indices=(-1,),
        in_chans=in_chans,
        **dict(backbone_kwargs or {}),
    )
    inject_blocks(encoder, inject)
    channels = last_feature_channels(encoder)
    decode_head = HEADS[head](
        channels,
        head_channels,
        num_classes,
        dropout_ratio=dropout,
        context_channels=channels,
        **dict(head_kwargs or {}),
    )
    return Segmenter(encoder, decode_head)


TASKS: dict[str, Callable[..., nn.Module]] = {"cls": build_classifier, "seg": build_segmenter}


def _params(builder: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(builder).parameters)


def config_keys() -> list[str]:
    """Every key :func:`build_model` accepts."""
    return sorted({"task"}.union(*(_params(b) for b in TASKS.values())))


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model a config dict describes.

    Args:
        cfg: ``task`` (``"cls"`` default, or ``"seg"``) and the keyword arguments of
            :func:`build_classifier` / :func:`build_segmenter`; ``backbone`` and
            ``num_classes`` are required.

    Returns:
        A timm classifier or a :class:`Segmenter`.

    Raises:
        ValueError: an unknown key, task, head or backbone (the message lists the valid
            ones), a missing required key, or an invalid injection spec.
    """
    unknown = sorted(set(cfg) - set(config_keys()))
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; valid keys: {', '.join(config_keys())}")
    task = cfg.get("task", "cls")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    params = _params(TASKS[task])
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in cfg]
    if missing:
        raise ValueError(f"model config for task {task!r} is missing key(s) {missing}")
    return TASKS[task](**{k: v for k, v in cfg.items() if k in params})
