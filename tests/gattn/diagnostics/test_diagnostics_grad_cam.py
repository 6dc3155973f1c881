"""Grad-CAM on a hand-built detector: lands on the object, hooks removed, layouts agree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gattn.diagnostics import grad_cam


class Detector(nn.Module):
    """Fixed weights: channel 0 fires on bright 3x3 neighbourhoods, channel 1 on dark ones.

    Class 0 ("bright thing") reads channel 0, class 1 ("dark") channel 1. ``seg=True`` gives
    per-pixel logits instead (1x1 conv), ``layout`` exposes the features as NCHW, NHWC or
    tokens with one prefix token, so the same map is seen through each layout.
    """

    def __init__(self, seg: bool = False, layout: str = "nchw") -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.stack([torch.full((1, 3, 3), 1 / 9)] * 2))
            self.conv.weight[1].neg_()
            self.conv.bias.copy_(torch.tensor([-0.5, 0.3]))
        self.features = nn.ReLU()
        self.view = nn.Identity()
        self.seg, self.layout = seg, layout
        self.classify = nn.Conv2d(2, 2, 1, bias=False)
        with torch.no_grad():
            self.classify.weight.copy_(torch.eye(2)[:, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(self.conv(x))
        B, C, H, W = f.shape
        if self.layout == "nhwc":
            f = self.view(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        elif self.layout == "tokens":
            tokens = torch.cat([torch.zeros(B, 1, C), f.flatten(2).transpose(1, 2)], 1)
            f = self.view(tokens)[:, 1:].transpose(1, 2).reshape(B, C, H, W)
        logits = self.classify(f)
        return logits if self.seg else logits.mean(dim=(2, 3))


def square_image() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = 0.1 * torch.rand(2, 1, 32, 40)
    inside = torch.zeros(2, 32, 40, dtype=torch.bool)
    inside[0, 18:26, 4:12] = True
    inside[1, 3:11, 25:33] = True
    x[inside[:, None]] = 1.0
    return x, inside


def argmax_pixel(cam: torch.Tensor) -> list[tuple[int, int]]:
    return [divmod(int(c.flatten().argmax()), c.shape[-1]) for c in cam]


@pytest.mark.parametrize("seg", [False, True])
def test_cam_lands_on_the_bright_square(seg):
    model = Detector(seg=seg).eval()
    x, inside = square_image()
    cam = grad_cam(model, x, "features", target=0)
    assert cam.shape == (2, 32, 40)
    assert cam.min() >= 0 and torch.allclose(cam.amax(dim=(1, 2)), torch.ones(2))
    for b, (i, j) in enumerate(argmax_pixel(cam)):
        assert inside[b, i, j]
    assert cam[~inside].mean() < 0.1 < cam[inside].mean()
    # The other class explains the dark background instead.
    dark = grad_cam(model, x, model.features, target=1)
    for b, (i, j) in enumerate(argmax_pixel(dark)):
        assert not inside[b, i, j]
    assert all(p.grad is None for p in model.parameters())
    assert not model.features._forward_hooks


def test_default_target_is_the_predicted_class():
    model = Detector().eval()
    x, _ = square_image()
    predicted = model(x).argmax(1)
    per_image = grad_cam(model, x, "features", target=predicted)
    torch.testing.assert_close(grad_cam(model, x, "features"), per_image)


@pytest.mark.parametrize("layout", ["nhwc", "tokens"])
def test_token_and_channels_last_layouts_match_nchw(layout):
    x, _ = square_image()
    ref = grad_cam(Detector().eval(), x, "features", target=0)
    model = Detector(layout=layout).eval()
    kwargs = {"layout": "nhwc"} if layout == "nhwc" else {"num_prefix_tokens": 1}
    torch.testing.assert_close(grad_cam(model, x, "view", target=0, **kwargs), ref)


def test_hook_removed_when_the_layer_does_not_run():
    model = Detector().eval()
    unused = nn.ReLU()
    model.unused = unused
    with pytest.raises(ValueError, match="did not run"):
        grad_cam(model, square_image()[0], "unused")
    assert not unused._forward_hooks
