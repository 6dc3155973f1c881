"""Blocks with a fused path never hold an (HW) x (HW) score matrix (peak tensor memory)."""

from __future__ import annotations

import pytest
import torch

from gattn import modules
from gattn.budget import peak_memory

C, S = 32, 48  # N = 2304 tokens: one fp32 N x N matrix is 20 MiB


@pytest.mark.parametrize("name", ["global_attn", "nonlocal", "global_tokens"])
def test_fused_path_does_not_materialise_scores(name: str) -> None:
    block = modules.create(name, C)
    n = S * S

    def step() -> None:
        x = torch.randn(1, C, S, S, requires_grad=True)
        block(x).square().mean().backward()

    peak = peak_memory(step, [block])
    assert peak < n * n * 4, f"{name}: peak {peak / 2**20:.1f} MiB >= one N x N matrix"


def test_plain_path_does_materialise_scores() -> None:
    # The measurement can tell: the plain (unfused) path holds the (heads, N, N) scores.
    block = modules.create("global_attn", C, fused_attn=False)

    def step() -> None:
        x = torch.randn(1, C, S, S, requires_grad=True)
        block(x).square().mean().backward()

    assert peak_memory(step, [block]) > (S * S) ** 2 * 4
