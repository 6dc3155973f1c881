"""Non-local head: an FCN head with a non-local block between its two convolutions.

Paper: Wang, Girshick, Gupta, He 2018, "Non-local Neural Networks" (CVPR),
https://arxiv.org/abs/1711.07971; head layout of mmsegmentation's ``NLHead``. The non-local
block lets every position of the ``channels``-wide map attend to every other one, so the head
sees the whole image at once (``O((hw)^2)`` memory, divided by ``sub_sample^2``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from gattn.modules.non_local import NonLocalBlock, NonLocalMode

from .fcn import FCNHead


class NLHead(FCNHead):
    """``conv -> NonLocalBlock -> conv``, then the FCN input concatenation.

    Args:
        in_channels, channels, num_classes: See :class:`~gattn.models.heads.base.DecodeHead`.
        mode: Non-local pairwise function (``"embedded_gaussian"`` or ``"dot_product"``).
        sub_sample: Max-pool factor of the non-local keys and values.
        inter_channels: Non-local embedding width; default ``channels // 2``.
        **kwargs: Options of :class:`~gattn.models.heads.fcn.FCNHead` (but ``num_convs``,
            which is 2) and of ``DecodeHead``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        mode: NonLocalMode = "embedded_gaussian",
        sub_sample: int = 1,
        inter_channels: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, channels, num_classes, num_convs=2, **kwargs)
        non_local = NonLocalBlock(
            channels, inter_channels, mode=mode, sub_sample=sub_sample, norm_layer=self.norm_layer
        )
        self.convs = nn.Sequential(self.convs[0], non_local, self.convs[1])

    @property
    def non_local(self) -> NonLocalBlock:
        """The non-local block (``convs[1]``)."""
        block = self.convs[1]
        assert isinstance(block, NonLocalBlock)
        return block
