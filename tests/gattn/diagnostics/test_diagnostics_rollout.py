"""Attention rollout: a hand-written reference, row sums, and fused timm ViTs."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

import gattn.models  # noqa: F401  (registers gattn_vit_global)
from gattn.diagnostics import attention_rollout, capture_attention, rollout, rollout_map
from gattn.modules.attention import GlobalSelfAttention


class TwoLayer(nn.Module):
    """Two residual global-attention layers on tokens ``(B, N, C)``, fused path on."""

    def __init__(self, dim: int = 12, heads: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            GlobalSelfAttention(dim, heads, fused_attn=True) for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def reference_attention(model: TwoLayer, x: torch.Tensor) -> list[np.ndarray]:
    """Attention probabilities computed from the weights, in numpy."""
    out = []
    t = x.detach().double().numpy()
    for layer in model.layers:
        w = layer.qkv.weight.detach().double().numpy()
        b = layer.qkv.bias.detach().double().numpy()
        B, N, C = t.shape
        h = layer.num_heads
        d = C // h
        qkv = (t @ w.T + b).reshape(B, N, 3, h, d)
        q, k = qkv[:, :, 0].transpose(0, 2, 1, 3), qkv[:, :, 1].transpose(0, 2, 1, 3)
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out.append(p)
        with torch.no_grad():
            t = (torch.from_numpy(t) + layer.double()(torch.from_numpy(t))).numpy()
        layer.float()
    return out


def reference_rollout(attentions: list[np.ndarray], fuse) -> np.ndarray:
    B, _, N, _ = attentions[0].shape
    results = []
    for b in range(B):
        r = np.eye(N)
        for a in attentions:
            m = 0.5 * (fuse(a[b], axis=0) + np.eye(N))
            m = m / m.sum(axis=1, keepdims=True)
            r = m @ r
        results.append(r)
    return np.stack(results)


@pytest.mark.parametrize(("fusion", "fuse"), [("mean", np.mean), ("max", np.max), ("min", np.min)])
def test_rollout_matches_hand_written_reference(fusion, fuse):
    torch.manual_seed(0)
    model = TwoLayer().eval()
    x = torch.randn(2, 7, 12)
    result = attention_rollout(model, x, head_fusion=fusion)
    expected = reference_rollout(reference_attention(model, x), fuse)
    np.testing.assert_allclose(result.double().numpy(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(result.sum(-1), torch.ones(2, 7))
    assert all(layer.fused_attn for layer in model.layers)


def test_discard_ratio_zeroes_weak_weights_and_keeps_rows_stochastic():
    torch.manual_seed(0)
    attn = torch.rand(2, 3, 6, 6).softmax(-1)
    kept = rollout([attn], discard_ratio=0.5)
    torch.testing.assert_close(kept.sum(-1), torch.ones(2, 6))
    # Off-diagonal entries of a 1-layer rollout are zero exactly where the fused weight was
    # discarded: 18 of 36 per image, minus the protected first entry if it was among them.
    fused = attn.mean(1)
    off_diag = ~torch.eye(6, dtype=torch.bool)
    for b in range(2):
        lowest = fused[b].flatten().argsort()[:18]
        dropped = torch.zeros(36, dtype=torch.bool)
        dropped[lowest] = True
        dropped[0] = False
        zero = (kept[b] == 0).flatten()
        assert torch.equal(zero, dropped & off_diag.flatten())


def test_rollout_on_timm_vit_with_fused_attention_restores_it():
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
    ).eval()
    attns = [m for m in model.modules() if isinstance(m, timm.models.vision_transformer.Attention)]
    for m in attns:
        m.fused_attn = True
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(image)
    result = attention_rollout(model, image, discard_ratio=0.2)
    assert result.shape == (2, 17, 17)  # class token + 4x4 patches
    torch.testing.assert_close(result.sum(-1), torch.ones(2, 17))
    assert all(m.fused_attn for m in attns)
    assert all(not m.attn_drop._forward_hooks for m in attns)
    with torch.no_grad():
        torch.testing.assert_close(model(image), before)
    heat = rollout_map(result, num_prefix_tokens=model.num_prefix_tokens)
    assert heat.shape == (2, 4, 4)
    torch.testing.assert_close(heat.amax(dim=(1, 2)), torch.ones(2))
    torch.testing.assert_close(heat[0].flatten(), result[0, 0, 1:] / result[0, 0, 1:].max())


def test_rollout_on_gattn_vit_global_without_class_token():
    torch.manual_seed(0)
    model = timm.create_model(
        "gattn_vit_global", img_size=32, depth=2, embed_dim=24, num_heads=2
    ).eval()
    image = torch.randn(1, 3, 32, 32)
    assert len(capture_attention(model, image)) == 2
    result = attention_rollout(model, image)
    assert model.num_prefix_tokens == 0 and result.shape == (1, 16, 16)
    heat = rollout_map(result, grid_size=(4, 4))
    torch.testing.assert_close(heat[0].flatten(), result[0].mean(0) / result[0].mean(0).max())


def test_flags_and_hooks_restored_on_error():
    class Broken(TwoLayer):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            super().forward(x)
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        attention_rollout(model, torch.randn(1, 4, 12))
    assert all(layer.fused_attn for layer in model.layers)
    assert all(not layer.attn_drop._forward_hooks for layer in model.layers)
