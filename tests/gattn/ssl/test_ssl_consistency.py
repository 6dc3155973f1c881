"""Global-local InfoNCE: equals a loop-by-loop reference, prefers aligned views."""

from __future__ import annotations

import math

import pytest
import torch

from gattn.ssl.consistency import GlobalLocalConsistencyLoss, global_local_infonce


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def reference(g: torch.Tensor, loc: torch.Tensor, tau: float, symmetric: bool) -> float:
    """InfoNCE written out: one term per (image, local slot, direction)."""
    b, n_local, _ = loc.shape
    gl, ll = g.tolist(), loc.tolist()
    terms = []
    for j in range(n_local):
        for i in range(b):
            # local view j of image i picks its image's global view among all globals
            logits = [cosine(ll[i][j], gl[k]) / tau for k in range(b)]
            terms.append(math.log(sum(math.exp(x) for x in logits)) - logits[i])
    if not symmetric:
        return sum(terms) / len(terms)
    back = []
    for j in range(n_local):
        for i in range(b):
            # the global view of image i picks its local view j among all images' local views j
            logits = [cosine(gl[i], ll[k][j]) / tau for k in range(b)]
            back.append(math.log(sum(math.exp(x) for x in logits)) - logits[i])
    return 0.5 * (sum(terms) / len(terms) + sum(back) / len(back))


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference(symmetric: bool) -> None:
    torch.manual_seed(0)
    g, loc = torch.randn(4, 6), torch.randn(4, 3, 6)
    loss = GlobalLocalConsistencyLoss(temperature=0.2, symmetric=symmetric)(g, loc)
    assert loss.item() == pytest.approx(reference(g, loc, 0.2, symmetric), rel=1e-5)


def test_single_local_view_as_2d_tensor() -> None:
    torch.manual_seed(1)
    g, loc = torch.randn(5, 8), torch.randn(5, 8)
    torch.testing.assert_close(
        global_local_infonce(g, loc), global_local_infonce(g, loc.unsqueeze(1))
    )


def test_aligned_views_score_lower_than_shuffled() -> None:
    torch.manual_seed(2)
    g = torch.randn(8, 16)
    aligned = g[:, None] + 0.3 * torch.randn(8, 4, 16)
    shuffled = aligned[torch.roll(torch.arange(8), 1)]
    assert global_local_infonce(g, aligned) < global_local_infonce(g, shuffled)


def test_gradients_reach_both_views() -> None:
    g = torch.randn(3, 4, requires_grad=True)
    loc = torch.randn(3, 2, 4, requires_grad=True)
    global_local_infonce(g, loc).backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    assert loc.grad is not None and loc.grad.abs().sum() > 0


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        global_local_infonce(torch.randn(3, 4), torch.randn(2, 2, 4))
    with pytest.raises(ValueError):
        GlobalLocalConsistencyLoss(temperature=0.0)
