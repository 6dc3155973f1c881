"""Frozen-feature probes: k-NN against a brute-force loop, the linear probe against sklearn."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gattn.ssl.curves import curves_figure, dino_collapse_references
from gattn.ssl.probe import (
    extract_features,
    fit_linear_probe,
    image_labels,
    knn_predict,
    probe_accuracies,
)


def brute_force_knn(train, labels, query, k, temperature, num_classes):
    """One query at a time, with Python floats: cosine, sort, weighted vote."""
    preds = []
    for q in query.tolist():
        qn = math.sqrt(sum(v * v for v in q))
        sims = []
        for x, y in zip(train.tolist(), labels.tolist(), strict=True):
            xn = math.sqrt(sum(v * v for v in x))
            sims.append((sum(a * b for a, b in zip(q, x, strict=True)) / (qn * xn), y))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, y in sims[:k]:
            votes[y] += math.exp(sim / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.1), (50, 0.5)])
def test_knn_matches_brute_force(k: int, temperature: float) -> None:
    g = torch.Generator().manual_seed(k)
    train, query = torch.randn(40, 6, generator=g), torch.randn(25, 6, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    got = knn_predict(train, labels, query, k, temperature, num_classes=4, chunk=7)
    expected = brute_force_knn(train, labels, query, min(k, 40), temperature, 4)
    assert torch.equal(got, expected)


def test_knn_is_scale_invariant_and_finds_exact_copies() -> None:
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(30, 8, generator=g), torch.arange(30) % 3
    # A query that is a scaled copy of a training point gets its label with k=1 (cosine).
    pred = knn_predict(train, labels, 5.0 * train[[4, 11, 27]], k=1)
    assert pred.tolist() == labels[[4, 11, 27]].tolist()
    with pytest.raises(ValueError, match="k=0"):
        knn_predict(train, labels, train, k=0)


def separable_blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well separated gaussian blobs in 5-D."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])
    labels = torch.arange(n) % 3
    return centres[labels] + 0.5 * torch.randn(n, 5, generator=g), labels


def test_linear_probe_separates_separable_data() -> None:
    train, test = separable_blobs(60, 0), separable_blobs(30, 1)
    probe = fit_linear_probe(*train, weight_decay=1e-3)
    assert torch.equal(probe.predict(train[0]), train[1])
    assert torch.equal(probe.predict(test[0]), test[1])
    assert probe_accuracies(train, test) == {"knn_acc": 1.0, "linear_acc": 1.0}


def test_linear_probe_matches_sklearn_logistic_regression() -> None:
    linear_model = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(80, 4, generator=g) * torch.tensor([1.0, 3.0, 0.5, 2.0]) + 1.0
    y = ((x[:, 0] + 0.3 * x[:, 1] + 0.5 * torch.randn(80, generator=g)) > 1.5).long()
    y[::7] = 2  # a third class
    wd = 0.05
    probe = fit_linear_probe(x, y, weight_decay=wd, max_iter=500)
    # sklearn minimises C * sum(CE) + ||W||^2 / 2, ours mean(CE) + wd * ||W||^2 / 2.
    z = ((x - probe.mean) / probe.std).double().numpy()
    ref = linear_model.LogisticRegression(C=1.0 / (len(y) * wd), tol=1e-10, max_iter=5000)
    ref.fit(z, y.numpy())
    ours = probe.logits(x).softmax(dim=1).double().numpy()
    assert ours == pytest.approx(ref.predict_proba(z), abs=1e-4)


def test_image_labels_take_the_most_frequent_foreground_class() -> None:
    masks = torch.zeros(4, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 2  # one foreground class
    masks[1, 0, :3], masks[1, 1, :1] = 1, 3  # 3 pixels of class 1 beat 1 of class 3
    masks[2, :, :] = 255  # ignored only: background
    masks[2, 0, 0] = 0
    masks[3, 0, :2], masks[3, 1, :2] = 3, 1  # a tie: the lower id
    assert image_labels(masks).tolist() == [2, 1, 0, 1]


class Pool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.seen_training: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        return self.scale * x.mean(dim=(2, 3))


def test_extract_features_is_frozen_and_restores_the_mode() -> None:
    enc = Pool().train()
    images = torch.rand(5, 3, 4, 4)
    masks = torch.zeros(5, 4, 4, dtype=torch.long)
    masks[:, 0, 0] = torch.tensor([1, 2, 3, 1, 0])
    batches = [(images[:3], masks[:3]), (images[3:], masks[3:])]
    feats, labels = extract_features(enc, batches, target_fn=image_labels)
    torch.testing.assert_close(feats, 2.0 * images.mean(dim=(2, 3)))
    assert labels.tolist() == [1, 2, 3, 1, 0]
    assert enc.seen_training == [False, False] and enc.training
    assert not feats.requires_grad
    with pytest.raises(ValueError, match="pooled"):
        extract_features(nn.Identity(), batches)


def test_curves_figure_writes_png_and_checks_lengths(tmp_path: Path) -> None:
    refs = dino_collapse_references(1024)
    assert refs["teacher_entropy"]["uniform collapse (log K)"] == pytest.approx(math.log(1024))
    path = curves_figure(
        [1, 2, 3],
        {"teacher_entropy": [6.0, 5.0, 4.0], "teacher_kl_to_mean": [0.1, 0.2, 0.3]},
        tmp_path / "c.png",
        "t",
        refs,
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="has 2 values for 3 steps"):
        curves_figure([1, 2, 3], {"loss": [1.0, 2.0]}, tmp_path / "d.png")
