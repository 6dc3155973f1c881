"""Model builders: timm backbones with injected global-context blocks, the article's recipes
(registered with timm as ``gattn_*``), segmentation heads, the FPN + FCOS detector and
:func:`build_model`."""

from . import recipes  # noqa: F401  (registers the gattn_* timm models)
from .build import (
    TASKS,
    build_classifier,
    build_detector,
    build_model,
    build_segmenter,
    config_keys,
    create_backbone,
    detector_recipes,
)
from .detector import Detector, DetOutputs
from .fpn import FeaturePyramid
from .heads import HEADS, ASPPHead, DecodeHead, FCNHead, NLHead, PSPHead
from .inject import Injection, inject, parse_spec
from .io import load_model, read_config, save_model
from .local_cnn import LocalCNN, receptive_field
from .recipes import DET_RECIPES
from .segmenter import Segmenter
from .stages import InjectedStage, LayoutAdapter, StageInfo, model_stages

__all__ = [
    "DET_RECIPES",
    "HEADS",
    "TASKS",
    "ASPPHead",
    "DecodeHead",
    "DetOutputs",
    "Detector",
    "FCNHead",
    "FeaturePyramid",
    "InjectedStage",
    "Injection",
    "LayoutAdapter",
    "LocalCNN",
    "NLHead",
    "PSPHead",
    "Segmenter",
    "StageInfo",
    "build_classifier",
    "build_detector",
    "build_model",
    "build_segmenter",
    "config_keys",
    "create_backbone",
    "detector_recipes",
    "inject",
    "load_model",
    "model_stages",
    "parse_spec",
    "read_config",
    "receptive_field",
    "save_model",
]
