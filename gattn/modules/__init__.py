"""Global-context blocks, one family per file, and a string registry over them.

``create(name, channels, **kw)`` builds any block by name; every registered block maps a
``(B, C, H, W)`` feature map to the same shape.
"""

from ._registry import available, block_kwargs, create, register_block
from .token_block import LayerScale, TokenMixerBlock

__all__ = [
    "available",
    "block_kwargs",
    "create",
    "register_block",
    "LayerScale",
    "TokenMixerBlock",
]
