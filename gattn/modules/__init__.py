"""Global-context blocks, one family per file, and a string registry over them.

``create(name, channels, **kw)`` builds any block by name; every registered block maps a
``(B, C, H, W)`` feature map to the same shape. Importing this package registers them all.
"""

from ._registry import available, block_kwargs, create, register_block
from .aspp import ASPP
from .attention import GlobalSelfAttention
from .cbam import CBAM
from .dilated import DilatedConvBlock, satisfies_hdc
from .global_tokens import GlobalTokenAttention
from .large_kernel import LargeKernelBlock, LargeKernelConv
from .non_local import NonLocalBlock
from .pyramid_pooling import PyramidPoolingModule
from .squeeze_excite import SEBlock
from .token_block import LayerScale, TokenMixerBlock
from .window_attention import ShiftedWindowAttention, WindowAttention

__all__ = [
    "available",
    "block_kwargs",
    "create",
    "register_block",
    "ASPP",
    "CBAM",
    "DilatedConvBlock",
    "GlobalSelfAttention",
    "GlobalTokenAttention",
    "LargeKernelBlock",
    "LargeKernelConv",
    "LayerScale",
    "NonLocalBlock",
    "PyramidPoolingModule",
    "SEBlock",
    "ShiftedWindowAttention",
    "TokenMixerBlock",
    "WindowAttention",
    "satisfies_hdc",
]
