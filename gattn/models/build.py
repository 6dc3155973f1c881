"""Build a classifier, a segmenter or a detector from a plain dict (params.yaml's ``model``).

Keyword-only builders, chosen by data (torchvision style): ``task`` picks a builder in
:data:`TASKS`, ``head`` a class in :data:`~gattn.models.heads.HEADS`, ``backbone`` any timm
model name including this project's ``gattn_*`` recipes, and ``inject`` is a spec for
:func:`~gattn.models.inject` (He et al. 2016, "Deep Residual Learning for Image Recognition",
and the other backbones are timm's). Example::

    build_model({"task": "seg", "backbone": "resnet18", "num_classes": 3, "img_size": 64,
                 "inject": "nonlocal@3", "head": "psp", "head_channels": 64, "dropout": 0.1})

Keys that only one task uses (``head``, ``head_channels``, ``min_level``, ``fpn_channels``, ...)
are ignored by the others, so one dict can serve pretraining (classification) and fine-tuning
(segmentation or detection). A detector can start from a registered ``gattn_det_*`` recipe
(:mod:`gattn.models.recipes`)::

    build_model({"task": "det", "recipe": "gattn_det_p2_ppm_lk", "num_classes": 3})

the recipe's settings fill in every key the dict leaves out.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm
from torch import nn

from .detector import Detector
from .fpn import GlobalAt, ModuleSpec
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
        recipes = sorted(set(timm.list_models("gattn_*")) - set(detector_recipes()))
        raise ValueError(
            f"unknown backbone {name!r}; did you mean {close or 'none'}? gattn recipes: "
            f"{', '.join(recipes)}; or any timm.list_models() name"
        )
    if name in detector_recipes():
        raise ValueError(
            f"{name!r} is a detector recipe, not a backbone; select it with "
            f"{{'task': 'det', 'recipe': {name!r}}}"
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


def build_detector(
    *,
    backbone: str,
    num_classes: int,
    in_chans: int = 3,
    img_size: int | None = None,
    inject: Spec = None,
    min_level: int = 3,
    max_level: int = 5,
    fpn_channels: int = 64,
    global_modules: Sequence[ModuleSpec] = (),
    global_at: GlobalAt = "top",
    pretrained: bool = False,
    backbone_kwargs: Mapping[str, Any] | None = None,
    head_kwargs: Mapping[str, Any] | None = None,
) -> Detector:
    """A :class:`Detector`: FPN levels ``P{min_level}`` up of the backbone, an FCOS head.

    Args:
        backbone, num_classes, in_chans, img_size, inject, pretrained, backbone_kwargs: As in
            :func:`build_classifier` (the backbone is built with ``features_only=True``).
        min_level: Finest FPN level: 2 (P2, stride 4) or 3 (P3, stride 8).
        max_level: Coarsest FPN level at most (P5; fewer where the backbone stops earlier).
        fpn_channels: Channels of the FPN levels and of the head.
        global_modules: Registry blocks in the FPN, names or ``{"block": name, **options}``
            (e.g. ``["ppm", {"block": "large_kernel", "kernel_size": 13}]``).
        global_at: ``"top"`` (the coarsest level, before the top-down path) or ``"all"``.
        head_kwargs: Further :class:`Detector` arguments (``num_convs``, ``prior_prob``,
            ``center_radius``).
    """
    encoder = create_backbone(
        backbone,
        pretrained=pretrained,
        img_size=img_size,
        features_only=True,
        in_chans=in_chans,
        **dict(backbone_kwargs or {}),
    )
    inject_blocks(encoder, inject)
    return Detector(
        encoder,
        num_classes,
        min_level=min_level,
        max_level=max_level,
        fpn_channels=fpn_channels,
        global_modules=global_modules,
        global_at=global_at,
        backbone=repr(backbone),
        **dict(head_kwargs or {}),
    )


TASKS: dict[str, Callable[..., nn.Module]] = {
    "cls": build_classifier,
    "seg": build_segmenter,
    "det": build_detector,
}


def detector_recipes() -> list[str]:
    """Names of the registered detector recipes (``gattn_det_*`` timm entrypoints)."""
    return timm.list_models("gattn_det_*")


def _params(builder: Callable[..., nn.Module]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(builder).parameters)


def config_keys() -> list[str]:
    """Every key :func:`build_model` accepts."""
    return sorted({"task", "recipe"}.union(*(_params(b) for b in TASKS.values())))


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model a config dict describes.

    Args:
        cfg: ``task`` (``"cls"`` default, ``"seg"`` or ``"det"``) and the keyword arguments
            of :func:`build_classifier` / :func:`build_segmenter` / :func:`build_detector`;
            ``backbone`` and ``num_classes`` are required, except that ``recipe`` (``task:
            det`` only, a :func:`detector_recipes` name) supplies ``backbone`` and defaults for
            every other key the dict leaves out.

    Returns:
        A timm classifier, a :class:`Segmenter` or a :class:`Detector`.

    Raises:
        ValueError: an unknown key, task, head, backbone or recipe (the message lists the
            valid ones), a missing required key, or an invalid injection spec.
    """
    unknown = sorted(set(cfg) - set(config_keys()))
    if unknown:
        raise ValueError(f"unknown model key(s) {unknown}; valid keys: {', '.join(config_keys())}")
    task = cfg.get("task", "cls")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    params = _params(TASKS[task])
    kwargs = {k: v for k, v in cfg.items() if k in params}
    recipe = cfg.get("recipe") if task == "det" else None  # other tasks ignore it
    if recipe is not None and recipe not in detector_recipes():
        raise ValueError(
            f"unknown detector recipe {recipe!r}; valid recipes: "
            f"{', '.join(detector_recipes())} (classifier and segmenter recipes are backbones: "
            "backbone: gattn_resnet_global)"
        )
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    missing = [n for n in required if n not in kwargs and not (recipe and n == "backbone")]
    if missing:
        raise ValueError(f"model config for task {task!r} is missing key(s) {missing}")
    if recipe is not None:  # its entrypoint fills in the keys left out (None ones included)
        return timm.create_model(recipe, **kwargs)
    return TASKS[task](**kwargs)
