"""The source article's recipes as timm models: ``timm.create_model("gattn_...")``.

Importing :mod:`gattn.models` registers them. Every recipe is a plain timm model (or its
``features_only`` version) with registry blocks injected by :func:`~gattn.models.inject`, so
``forward``, ``forward_features``, ``features_only=True``, ``num_classes``, ``in_chans`` and
the family's own keyword arguments work as usual. Defaults are small (64-pixel inputs) so they
train on a CPU; pass the usual timm arguments (``img_size``, ``embed_dim``, ``depths``, ...)
to scale them up. No pretrained weights exist: ``pretrained=True`` is an error (pretrain them
with this project's ``gattn pretrain`` instead).

* ``gattn_local_cnn``: the local baseline, a 19-pixel receptive field
  (:class:`~gattn.models.local_cnn.LocalCNN`).
* ``gattn_resnet_global`` / ``gattn_resnet_global_tiny``: recipe 1, a global-enhanced CNN: a
  ResNet-18 with a non-local block (Wang et al. 2018, "Non-local Neural Networks") after
  ``layer3`` (two thirds of the depth), a pyramid pooling module (Zhao et al. 2017, PSPNet)
  and squeeze-excitation (Hu et al. 2018) after ``layer4``.
* ``gattn_swin_global_tokens``: recipe 2, Swin (Liu et al. 2021) with learned global tokens
  after every stage, each stage with its own tokens at its own width (the article reused one
  set of ``embed_dim``-wide tokens for stages of different widths).
* ``gattn_vit_global``: recipe 3's encoder, a plain ViT (Dosovitskiy et al. 2021) whose every
  block is global self-attention, ready for MAE (He et al. 2022): no class token by default
  (average pooling), and ``model.patch_embed.patch_size`` / ``model.patch_embed.grid_size``
  give the patch grid to mask.

Detector recipes (:class:`~gattn.models.detector.Detector`: FPN + FCOS head, Lin et al. 2017,
Tian et al. 2019), the source article's small-object scenario ("PPM + large-kernel
convolution + a P2 detection level: keep the detail while strengthening global context") and
its controls. Each is a plain :func:`~gattn.models.build.build_detector` config
(:data:`DET_RECIPES`), selected by ``build_model({"task": "det", "recipe": name, ...})`` or
``timm.create_model(name, num_classes=K)``; any key given overrides the recipe's. All share a
CPU-sized ResNet-18 (one block per stage, widths 16-128), 64 FPN channels and 2 convs per
head tower, so they differ only in the levels and the global blocks:

* ``gattn_det_p3``: the local baseline, FPN P3-P5, no global block.
* ``gattn_det_p2``: + the stride-4 P2 level (objects up to 32 px are learnt there).
* ``gattn_det_p2_ppm_lk``: the article's recipe, P2 + a pyramid pooling module (Zhao et al.
  2017) and a 13x13 large-kernel block (Ding et al. 2022, RepLKNet) on P5, before the
  top-down path, so their context reaches P2.
* ``gattn_det_p2_tokens``: P2 + 8 global tokens (windows of 4) on P5.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    register_model,
)
from torch import nn

# The blocks the recipes inject, registered on import.
import gattn.modules.global_tokens  # noqa: F401
import gattn.modules.non_local  # noqa: F401
import gattn.modules.pyramid_pooling  # noqa: F401
import gattn.modules.squeeze_excite  # noqa: F401

from .build import build_detector
from .inject import Spec, inject
from .local_cnn import DEFAULT_WIDTHS, LocalCNN

DEFAULT_IMG_SIZE = 64

RESNET_GLOBAL_SPEC = "nonlocal@3,ppm@4,se@4"


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, DEFAULT_IMG_SIZE, DEFAULT_IMG_SIZE),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "license": "apache-2.0",
        **kwargs,
    }


_RESNET_CFG = {"first_conv": "conv1", "classifier": "fc"}
_PATCH_CFG = {"first_conv": "patch_embed.proj", "fixed_input_size": True}

# Read by timm's ``register_model`` at decoration time, so it precedes the entrypoints.
default_cfgs = generate_default_cfgs(
    {
        "gattn_local_cnn": _cfg(first_conv="stages.0.0.conv", classifier="head.fc"),
        "gattn_resnet_global": _cfg(**_RESNET_CFG),
        "gattn_resnet_global_tiny": _cfg(**_RESNET_CFG),
        "gattn_swin_global_tokens": _cfg(classifier="head.fc", **_PATCH_CFG),
        "gattn_vit_global": _cfg(classifier="head", **_PATCH_CFG),
    }
)


def _model_args(
    name: str, pretrained: bool, kwargs: dict[str, Any], takes_img_size: bool
) -> dict[str, Any]:
    """The recipe's timm arguments, with its own pretrained config at the requested size."""
    if pretrained:
        raise ValueError(
            f"{name} has no pretrained weights; create it with pretrained=False "
            "(and pretrain it with `gattn pretrain`)"
        )
    args = dict(kwargs)
    img_size = args["img_size"] if takes_img_size else args.pop("img_size", DEFAULT_IMG_SIZE)
    in_chans = args.get("in_chans", 3)
    args["pretrained_cfg"] = args.get("pretrained_cfg") or get_pretrained_cfg(name)
    args["pretrained_cfg_overlay"] = {
        "architecture": name,
        "input_size": (in_chans, *to_2tuple(img_size)),
        **(args.get("pretrained_cfg_overlay") or {}),
    }
    return args


def _create(
    name: str, base: str, pretrained: bool, spec: Spec, takes_img_size: bool, **kwargs: Any
) -> nn.Module:
    model = timm.create_model(base, **_model_args(name, pretrained, kwargs, takes_img_size))
    return inject(model, spec)


@register_model
def gattn_local_cnn(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The local baseline: two stages of two 3x3 convs, stride 4, receptive field 19 px."""
    args = _model_args("gattn_local_cnn", pretrained, kwargs, takes_img_size=False)
    num_stages = len(args.get("widths", DEFAULT_WIDTHS))
    return build_model_with_cfg(
        LocalCNN,
        "gattn_local_cnn",
        pretrained=False,
        feature_cfg={"flatten_sequential": True, "out_indices": tuple(range(num_stages))},
        **args,
    )


@register_model
def gattn_resnet_global(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Recipe 1: ResNet-18 + non-local after ``layer3`` + PPM and SE after ``layer4``."""
    return _create(
        "gattn_resnet_global",
        "resnet18",
        pretrained,
        RESNET_GLOBAL_SPEC,
        takes_img_size=False,
        **kwargs,
    )


@register_model
def gattn_resnet_global_tiny(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Recipe 1 at CPU size: one basic block per stage, widths 16-128."""
    args = {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128), **kwargs}
    return _create(
        "gattn_resnet_global_tiny",
        "resnet18",
        pretrained,
        RESNET_GLOBAL_SPEC,
        takes_img_size=False,
        **args,
    )


@register_model
def gattn_swin_global_tokens(
    pretrained: bool = False, num_global_tokens: int = 4, **kwargs: Any
) -> nn.Module:
    """Recipe 2: Swin with ``num_global_tokens`` global tokens after every stage.

    Each stage gets its own :class:`~gattn.modules.global_tokens.GlobalTokenAttention` at the
    stage's width, windowed like the stage (``window_size``).
    """
    args = {
        "img_size": DEFAULT_IMG_SIZE,
        "patch_size": 4,
        "window_size": 4,
        "embed_dim": 32,
        "depths": (2, 2, 2, 2),
        "num_heads": (1, 2, 4, 8),
        **kwargs,
    }
    spec = [
        {
            "block": "global_tokens",
            "stage": stage,
            "window_size": args["window_size"],
            "num_global_tokens": num_global_tokens,
        }
        for stage in range(1, len(args["depths"]) + 1)
    ]
    return _create(
        "gattn_swin_global_tokens",
        "swin_tiny_patch4_window7_224",
        pretrained,
        spec,
        takes_img_size=True,
        **args,
    )


@register_model
def gattn_vit_global(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Recipe 3's encoder: a small ViT, global attention in every block, MAE-ready."""
    args = {
        "img_size": DEFAULT_IMG_SIZE,
        "patch_size": 8,
        "embed_dim": 96,
        "depth": 4,
        "num_heads": 3,
        "class_token": False,
        "global_pool": "avg",
        **kwargs,
    }
    return _create(
        "gattn_vit_global", "vit_tiny_patch16_224", pretrained, None, takes_img_size=True, **args
    )


_DET_BASE: dict[str, Any] = {
    "backbone": "resnet18",
    "backbone_kwargs": {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]},
    "fpn_channels": 64,
    "head_kwargs": {"num_convs": 2},
}

DET_RECIPES: dict[str, dict[str, Any]] = {
    "gattn_det_p3": {**_DET_BASE, "min_level": 3},
    "gattn_det_p2": {**_DET_BASE, "min_level": 2},
    "gattn_det_p2_ppm_lk": {
        **_DET_BASE,
        "min_level": 2,
        "global_modules": [
            {"block": "ppm", "pool_sizes": [1, 2, 3, 6]},
            {"block": "large_kernel", "kernel_size": 13},
        ],
        "global_at": "top",
    },
    "gattn_det_p2_tokens": {
        **_DET_BASE,
        "min_level": 2,
        "global_modules": [
            {
                "block": "global_tokens",
                "window_size": 4,
                "num_global_tokens": 8,
                "ls_init_value": None,
            }
        ],
        "global_at": "top",
    },
}


def resolve_recipe(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A :func:`~gattn.models.build_model` config with its detector recipe's settings filled
    in where it leaves them out (``backbone``, ``backbone_kwargs``...), so that what it builds
    is explicit (e.g. which backbone a pretrained encoder must be); other configs as they are.
    """
    recipe = cfg.get("recipe") if cfg.get("task") == "det" else None
    if recipe is None:
        return dict(cfg)
    return {**copy.deepcopy(DET_RECIPES[recipe]), **cfg}


# timm.create_model's own arguments, passed to every entrypoint; a detector takes none of them.
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _detector(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    """``build_detector`` of the recipe's config, updated by ``kwargs`` (``pretrained``: timm's
    weights for the backbone)."""
    args = {k: v for k, v in kwargs.items() if k not in _TIMM_ONLY}
    return build_detector(**{**DET_RECIPES[name], "pretrained": pretrained, **args})


@register_model
def gattn_det_p3(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The local detection baseline: FPN P3-P5 and an FCOS head, no global block."""
    return _detector("gattn_det_p3", pretrained, kwargs)


@register_model
def gattn_det_p2(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """FPN P2-P5 and an FCOS head: the stride-4 level for small objects, no global block."""
    return _detector("gattn_det_p2", pretrained, kwargs)


@register_model
def gattn_det_p2_ppm_lk(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The article's small-object recipe: P2 + PPM + large-kernel block on P5."""
    return _detector("gattn_det_p2_ppm_lk", pretrained, kwargs)


@register_model
def gattn_det_p2_tokens(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """P2 + global tokens on P5."""
    return _detector("gattn_det_p2_tokens", pretrained, kwargs)
