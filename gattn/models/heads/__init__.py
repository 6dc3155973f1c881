"""Segmentation decode heads sharing :class:`DecodeHead` (mmsegmentation style).

``HEADS`` maps the names used by :func:`gattn.models.build_model` (``head:``) to classes.
"""

from .base import DecodeHead
from .deeplab import ASPPHead
from .fcn import FCNHead
from .nonlocal_head import NLHead
from .psp import PSPHead

HEADS: dict[str, type[DecodeHead]] = {
    "fcn": FCNHead,
    "psp": PSPHead,
    "deeplabv3": ASPPHead,
    "nonlocal": NLHead,
}

__all__ = ["HEADS", "ASPPHead", "DecodeHead", "FCNHead", "NLHead", "PSPHead"]
