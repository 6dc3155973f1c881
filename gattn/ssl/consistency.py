"""Global-local consistency: InfoNCE between a whole-image embedding and its local crops.

The source article's auxiliary loss (its "一致性与对比学习" sketch), in the InfoNCE form of
van den Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding"
(https://arxiv.org/abs/1807.03748), made symmetric as in Radford et al. 2021, CLIP. A local
view's positive is the global view of the same image and its negatives are the global views
of the other images in the batch; in the other direction a global view's positive is its
image's local view and its negatives the other images' local views.

The article's sketch computed ``global_feat @ local_feats.T``, which for local features
``(B, L, D)`` transposes the wrong axes (``.T`` on a 3-D tensor reverses all of them) and only
works for one local view per image. Here local features are ``(B, L, D)`` and every local slot
``l`` gives its own ``B x B`` similarity matrix against the global views; the loss is the mean
over slots (and, when symmetric, over both directions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlobalLocalConsistencyLoss", "global_local_infonce"]


def global_local_infonce(
    global_feats: torch.Tensor,
    local_feats: torch.Tensor,
    temperature: float = 0.1,
    symmetric: bool = True,
) -> torch.Tensor:
    """InfoNCE between global views ``(B, D)`` and local views ``(B, L, D)`` or ``(B, D)``.

    Args:
        global_feats: One embedding per image.
        local_feats: ``L`` local-view embeddings per image (a ``(B, D)`` tensor is ``L = 1``).
        temperature: Softmax temperature of the cosine similarities.
        symmetric: Average the local-to-global and global-to-local directions; otherwise
            local-to-global only (each local view picks its image's global view).

    Returns:
        The scalar loss, averaged over images, local slots and directions.
    """
    if local_feats.ndim == 2:
        local_feats = local_feats.unsqueeze(1)
    b, _, d = local_feats.shape
    if global_feats.shape != (b, d):
        raise ValueError(
            f"global features {tuple(global_feats.shape)} do not match local features "
            f"{tuple(local_feats.shape)}: expected (B, D) and (B, L, D)"
        )
    g = F.normalize(global_feats.float(), dim=-1)
    loc = F.normalize(local_feats.float(), dim=-1)
    # logits[l, i, j] = cos(local view l of image i, global view of image j) / temperature
    logits = torch.einsum("ild,jd->lij", loc, g) / temperature
    labels = torch.arange(b, device=logits.device).repeat(logits.shape[0])
    loss = F.cross_entropy(logits.reshape(-1, b), labels)
    if symmetric:
        to_local = F.cross_entropy(logits.transpose(1, 2).reshape(-1, b), labels)
        loss = 0.5 * (loss + to_local)
    return loss


class GlobalLocalConsistencyLoss(nn.Module):
    """Module form of :func:`global_local_infonce`, an optional auxiliary objective.

    Args:
        temperature: Softmax temperature of the cosine similarities.
        symmetric: Use both directions (global-to-local and local-to-global).
    """

    def __init__(self, temperature: float = 0.1, symmetric: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.temperature = temperature
        self.symmetric = symmetric

    def forward(self, global_feats: torch.Tensor, local_feats: torch.Tensor) -> torch.Tensor:
        return global_local_infonce(global_feats, local_feats, self.temperature, self.symmetric)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}"
