"""Frozen-feature evaluation of an encoder: weighted k-NN and a linear probe.

Does self-supervised pretraining help? Freeze the encoder, extract one pooled feature vector
per image and classify with

- a weighted k-nearest-neighbour vote under cosine similarity (Wu et al., "Unsupervised
  Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018; the k-NN protocol of
  Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021: the
  ``k`` most similar training features vote with weight ``exp(sim / T)``);
- a linear probe: multinomial logistic regression with an L2 penalty on standardised features,
  fitted full-batch with L-BFGS (the linear-probing protocol of He et al., "Masked Autoencoders
  Are Scalable Vision Learners", CVPR 2022, which also standardises the features).

Comparing these against the same architecture at its random initialisation tells whether the
pretraining learnt anything. Segmentation data gets an image-level label from its mask
(:func:`image_labels`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gattn.data.datasets import IGNORE_INDEX

__all__ = [
    "LinearProbe",
    "extract_features",
    "fit_linear_probe",
    "image_labels",
    "knn_predict",
    "probe_accuracies",
]


def image_labels(
    masks: torch.Tensor, background: int = 0, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Image-level labels of segmentation masks: the most frequent foreground class.

    Args:
        masks: Class ids ``(B, H, W)``.
        background: The background class, which never wins unless nothing else is present.
        ignore_index: Pixels that count for nothing.

    Returns:
        ``(B,)`` long: per image the non-background class with the most pixels (the lowest
        id on a tie), or ``background`` where the mask holds no other class.
    """
    flat = masks.reshape(masks.shape[0], -1).long()
    valid = (flat != background) & (flat != ignore_index) & (flat >= 0)
    num_classes = int(flat[valid].max()) + 1 if valid.any() else background + 1
    counts = torch.zeros(flat.shape[0], num_classes, dtype=torch.long, device=flat.device)
    counts.scatter_add_(1, flat.where(valid, 0), valid.long())
    counts[:, background] = 0
    return counts.argmax(dim=1).where(counts.sum(dim=1) > 0, background)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
    target_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of a frozen encoder over ``(images, targets)`` batches.

    Args:
        encoder: ``(B, C, H, W) -> (B, D)`` (a timm model created with ``num_classes=0``); run
            in eval mode, then put back in the mode it was in.
        batches: An iterable of ``(images, targets)``, e.g. a ``DataLoader``.
        device: Where the encoder runs.
        target_fn: Maps a batch of targets to labels (e.g. :func:`image_labels` for masks).

    Returns:
        ``(features, labels)``: float32 ``(N, D)`` and long ``(N,)``, on the CPU.
    """
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, targets in batches:
            out = encoder(images.to(device))
            if out.ndim != 2:
                raise ValueError(
                    f"encoder returned {tuple(out.shape)}, expected pooled (B, D) features "
                    "(create timm models with num_classes=0)"
                )
            feats.append(out.float().cpu())
            labels.append((target_fn(targets) if target_fn else targets).long().cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("no batches to extract features from")
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Weighted k-NN classes of ``query_feats`` under cosine similarity.

    Each query's ``k`` most cosine-similar training samples vote for their label with weight
    ``exp(similarity / temperature)``; the class with the largest total wins (the lowest id on
    a tie).

    Args:
        train_feats: ``(N, D)``.
        train_labels: ``(N,)`` class ids.
        query_feats: ``(M, D)``.
        k: Neighbours (capped at ``N``).
        temperature: Vote sharpness; small values approach a plain nearest-neighbour vote.
        num_classes: Classes (default: ``max(train_labels) + 1``).
        chunk: Queries per similarity block (bounds memory at ``chunk * N``).

    Returns:
        ``(M,)`` long predicted classes.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"k={k} must be >= 1 and temperature={temperature} > 0")
    if train_feats.shape[0] != train_labels.shape[0] or train_feats.shape[0] == 0:
        raise ValueError(
            f"{train_feats.shape[0]} training features for {train_labels.shape[0]} labels"
        )
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_feats.shape[0])
    train = F.normalize(train_feats.float(), dim=1)
    preds = []
    for query in F.normalize(query_feats.float(), dim=1).split(chunk):
        sim, idx = (query @ train.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


@dataclass
class LinearProbe:
    """A fitted linear classifier on standardised features: ``((x - mean) / std) @ W.T + b``."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return F.linear((feats.float() - self.mean) / self.std, self.weight, self.bias)

    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        return self.logits(feats).argmax(dim=1)


def fit_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
    eps: float = 1e-6,
) -> LinearProbe:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS.

    Minimises ``mean_i CE(W x_i + b, y_i) + weight_decay / 2 * ||W||^2`` (the bias is not
    penalised), a strictly convex problem, from zero weights, so the result is deterministic.

    Args:
        feats: ``(N, D)`` training features.
        labels: ``(N,)`` class ids.
        num_classes: Classes (default: ``max(labels) + 1``).
        weight_decay: L2 penalty on the weights (> 0 keeps separable data bounded).
        max_iter: L-BFGS iterations.
        eps: Added to the feature standard deviations (constant features stay finite).
    """
    if feats.shape[0] != labels.shape[0] or feats.shape[0] == 0:
        raise ValueError(f"{feats.shape[0]} features for {labels.shape[0]} labels")
    num_classes = num_classes or int(labels.max()) + 1
    x = feats.float()
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False) + eps
    x = (x - mean) / std
    labels = labels.long()
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, weight, bias), labels)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean, std, weight.detach(), bias.detach())


def probe_accuracies(
    train: tuple[torch.Tensor, torch.Tensor],
    query: tuple[torch.Tensor, torch.Tensor],
    k: int = 20,
    temperature: float = 0.07,
    weight_decay: float = 1e-3,
    num_classes: int | None = None,
) -> dict[str, float]:
    """``{"knn_acc", "linear_acc"}`` on ``query`` of a k-NN and a linear probe fit on ``train``.

    Args:
        train: ``(features, labels)`` the probes are fitted on.
        query: ``(features, labels)`` they are scored on.
        k, temperature: :func:`knn_predict`'s.
        weight_decay: :func:`fit_linear_probe`'s.
        num_classes: Classes (default: the largest label in either set + 1).
    """
    num_classes = num_classes or int(max(train[1].max(), query[1].max())) + 1
    knn = knn_predict(train[0], train[1], query[0], k, temperature, num_classes)
    linear = fit_linear_probe(train[0], train[1], num_classes, weight_decay).predict(query[0])
    return {
        "knn_acc": float((knn == query[1]).float().mean()),
        "linear_acc": float((linear == query[1]).float().mean()),
    }
