"""Effective receptive field: exact for one conv, monotone ratios, global beats local."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gattn.modules.attention  # noqa: F401  (registers global_attn)
from gattn.diagnostics import area_ratios, effective_receptive_field, heatmap, overlay_heatmap
from gattn.modules._registry import create


def test_single_conv_has_exact_3x3_support():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    images = torch.randn(5, 2, 15, 15)
    erf = effective_receptive_field(conv, images, batch_size=2)
    # d(sum_k out[k, 7, 7]) / d x[c, 7 + dy, 7 + dx] = sum_k w[k, c, 1 + dy, 1 + dx].
    expected = torch.zeros(15, 15)
    expected[6:9, 6:9] = 5 * conv.weight.detach().sum(0).abs().sum(0)
    torch.testing.assert_close(erf.map, expected)
    assert erf.num_images == 5
    assert erf.area_ratios[0.99] <= 9 / 225


def test_area_ratios_by_hand():
    values = torch.tensor([1.0, 4.0, 0.0, 3.0, 2.0])  # sorted: 4 3 2 1 0, total 10
    ratios = area_ratios(values, (0.2, 0.4, 0.5, 0.95, 1.0))
    assert ratios == {0.2: 0.2, 0.4: 0.2, 0.5: 0.4, 0.95: 0.8, 1.0: 0.8}
    assert area_ratios(torch.zeros(3, 3)) == {0.2: 0.0, 0.5: 0.0, 0.99: 0.0}
    with pytest.raises(ValueError):
        area_ratios(torch.tensor([-1.0, 2.0]))


def local_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


def global_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        create("global_attn", 8, ls_init_value=1.0),
        nn.Conv2d(8, 8, 3, padding=1),
    )


def test_global_model_sees_further_than_local():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 16, 16)
    local = effective_receptive_field(local_cnn().eval(), images)
    glob = effective_receptive_field(global_cnn().eval(), images)
    for erf in (local, glob):
        r = erf.area_ratios
        assert 0 < r[0.2] <= r[0.5] <= r[0.99] <= 1
    assert local.area_ratios[0.99] <= 25 / 256  # two 3x3 convs: a 5x5 support
    assert (local.map > 0).sum() <= 25
    assert glob.area_ratios[0.99] > 2 * local.area_ratios[0.99]
    assert (glob.map > 0).all()


def test_model_must_return_a_map():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="map"):
        effective_receptive_field(model, torch.randn(1, 3, 8, 8))


def test_plots_write_png(tmp_path):
    image = (np.random.default_rng(0).random((20, 30, 3)) * 255).astype(np.uint8)
    out = overlay_heatmap(
        image,
        {"grad-cam": np.random.rand(20, 30), "rollout": np.random.rand(4, 6)},
        tmp_path / "a" / "overlay.png",
    )
    erf = heatmap(np.random.rand(16, 16), tmp_path / "erf.png", title="ERF", log=True)
    for path in (out, erf):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.rglob(".*.tmp"))
