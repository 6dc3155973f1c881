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


def test_target_sequence_must_match_the_batch():
    model = Detector().eval()
    x, _ = square_image()
    with pytest.raises(ValueError, match="batch of 2 images"):
        grad_cam(model, x, "features", target=[0])
    with pytest.raises(ValueError, match="not a class id"):
        grad_cam(model, x, "features", target=[0, 2])
    # One int is broadcast to every image.
    torch.testing.assert_close(
        grad_cam(model, x, "features", target=1), grad_cam(model, x, "features", target=[1, 1])
    )


# A plain Grad-CAM (Selvaraju et al. 2017) written independently of gattn: a forward hook
# keeps the layer's output ``o`` and hands the layers after it ``o.clone()``, so an in-place
# op downstream cannot change ``o``; weights = mean gradient over space, map = ReLU of the
# weighted sum, bilinear to the input, min-max scaled per image. Without the clone (``copy=
# False``, which is what pytorch-grad-cam 1.5.7 does) ``o`` is overwritten at timm ResNet's
# bn1/bn2 (the ReLU or residual add after them is in place).
def reference_grad_cam(
    model: nn.Module, x: torch.Tensor, layer: str, target: list[int], copy: bool = True
) -> torch.Tensor:
    kept = {}

    def hook(_m, _i, o):
        kept["o"] = o
        return o.clone() if copy else None

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        logits = model(x)
        score = logits[torch.arange(len(target)), torch.tensor(target)].sum()
        (g,) = torch.autograd.grad(score, kept["o"])
    finally:
        handle.remove()
    a = kept["o"].detach()
    cam = torch.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    low = cam.flatten(1).min(1).values[:, None, None]
    high = cam.flatten(1).max(1).values[:, None, None]
    return (cam - low) / (high - low)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # zero_init_last=False: timm zeroes bn2's weight by default, which would make its map 0.
    return timm.create_model("resnet18", num_classes=10, zero_init_last=False).eval()


@pytest.mark.parametrize("layer", ["layer4.1.bn1", "layer4.1.bn2", "layer3", "layer4"])
def test_timm_resnet_matches_a_plain_reference_at_in_place_layers(resnet18, layer):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 96, 96)
    target = [3, 6]
    ref = reference_grad_cam(resnet18, x, layer, target)
    assert (ref.amax(dim=(1, 2)) == 1).all()  # a real map, not the all-zero one
    torch.testing.assert_close(grad_cam(resnet18, x, layer, target), ref, rtol=0, atol=1e-5)
    if layer.endswith(("bn1", "bn2")):
        # The reference is sensitive to the defect it guards against: without the copy the
        # kept activation is the post-ReLU/residual one and the map differs.
        wrong = reference_grad_cam(resnet18, x, layer, target, copy=False)
        assert (wrong - ref).abs().max() > 1e-2


def test_detection_scores_are_the_logits_at_the_top_detections() -> None:
    from gattn.diagnostics.detection import DetectionScores, FinestClassMap, top_class
    from gattn.models import build_model
    from gattn.models.fcos import flatten_levels

    torch.manual_seed(0)
    det = build_model({"task": "det", "recipe": "gattn_det_p2", "num_classes": 3}).eval()
    x = torch.rand(1, 3, 64, 64)
    scores = DetectionScores(det)(x)
    out = det(x)
    logits = flatten_levels(out.cls_logits)[0]
    combined = (logits.sigmoid() * flatten_levels(out.centerness)[0].sigmoid()).sqrt()
    for k in range(3):
        where = int(combined[:, k].argmax())
        assert scores[0, k] == logits[where, k]
    (found,) = det.predict(x, score_thresh=0.0, max_det=1)
    assert top_class(det, x) == int(found["labels"][0]) == int(combined.max(0).values.argmax())
    assert FinestClassMap(det)(x).shape == (1, 3, 16, 16)  # P2: stride 4
    cam = grad_cam(DetectionScores(det), x, det.encoder.layer4, top_class(det, x))
    assert cam.shape == (1, 64, 64) and 0 <= float(cam.min()) <= float(cam.max()) <= 1
