"""Model builders: timm backbones with injected global-context blocks, the article's recipes
(registered with timm as ``gattn_*``), segmentation heads and :func:`build_model`."""

from . import recipes  # noqa: F401  (registers the gattn_* timm models)
from .build import (
    TASKS,
    build_classifier,
    build_model,
    build_segmenter,
    config_keys,
    create_backbone,
)
from .heads import HEADS, ASPPHead, DecodeHead, FCNHead, NLHead, PSPHead
from .inject import Injection, inject, parse_spec
from .io import load_model, read_config, save_model
from .local_cnn import LocalCNN, receptive_field
from .segmenter import Segmenter
from .stages import InjectedStage, LayoutAdapter, StageInfo, model_stages

__all__ = [
    "HEADS",
    "TASKS",
    "ASPPHead",
    "DecodeHead",
    "FCNHead",
    "InjectedStage",
    "Injection",
    "LayoutAdapter",
    "LocalCNN",
    "NLHead",
    "PSPHead",
    "Segmenter",
    "StageInfo",
    "build_classifier",
    "build_model",
    "build_segmenter",
    "config_keys",
    "create_backbone",
    "inject",
    "load_model",
    "model_stages",
    "parse_spec",
    "read_config",
    "receptive_field",
    "save_model",
]
