"""Model builders: timm backbones with injected global-context blocks, the article's recipes
(registered with timm as ``gattn_*``), segmentation heads and :func:`build_model`."""

from . import recipes  # noqa: F401  (registers the gattn_* timm models)
from .heads import HEADS, ASPPHead, DecodeHead, FCNHead, NLHead, PSPHead
from .inject import Injection, inject, parse_spec
from .local_cnn import LocalCNN, receptive_field
from .stages import InjectedStage, StageInfo, model_stages

__all__ = [
    "HEADS",
    "ASPPHead",
    "DecodeHead",
    "FCNHead",
    "InjectedStage",
    "Injection",
    "LocalCNN",
    "NLHead",
    "PSPHead",
    "StageInfo",
    "inject",
    "model_stages",
    "parse_spec",
    "receptive_field",
]
