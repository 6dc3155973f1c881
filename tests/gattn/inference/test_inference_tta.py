"""Test-time augmentation: invariant models are unchanged; batched equals a plain loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gattn.inference import tta


def seg_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))


def cls_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def test_invariant_seg_model_equals_its_softmax():
    """A pointwise model commutes with flips, and nearest resizing by integer factors is
    undone exactly, so every view gives the model's own probabilities."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Tanh(), nn.Conv2d(6, 4, 1)).eval()
    image = torch.randn(2, 3, 9, 13)
    out = tta(model, image, scales=(1.0, 2.0, 3.0), flip=True, mode="nearest")
    torch.testing.assert_close(out, model(image).softmax(1))


def test_invariant_cls_model_equals_its_softmax():
    torch.manual_seed(0)
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5)).eval()
    image = torch.randn(2, 3, 8, 10)
    out = tta(model, image, scales=(1.0, 2.0), task="cls", mode="nearest")
    torch.testing.assert_close(out, model(image).softmax(1))


def sequential_reference(model, image, scales, flip, task):
    """One forward per view, logits -> probabilities -> undo the view -> average."""
    views = []
    H, W = image.shape[-2:]
    for s in scales:
        size = (max(1, round(H * s)), max(1, round(W * s)))
        x = F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for flipped in [False, True] if flip else [False]:
            xi = x.flip(-1) if flipped else x
            p = model(xi).softmax(1)
            if task == "seg":
                p = p.flip(-1) if flipped else p
                p = F.interpolate(p, size=(H, W), mode="bilinear", align_corners=False)
            views.append(p)
    return torch.stack(views).mean(0)


def test_batched_equals_sequential_reference():
    image = torch.randn(2, 3, 15, 18)
    with torch.no_grad():
        for model, task in [(seg_model().eval(), "seg"), (cls_model().eval(), "cls")]:
            for flip in (True, False):
                scales = (0.75, 1.0, 1.25)
                out = tta(model, image, scales=scales, flip=flip, task=task)
                ref = sequential_reference(model, image, scales, flip, task)
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_outputs_are_probabilities_at_input_size():
    image = torch.randn(1, 3, 11, 17)
    out = tta(seg_model().eval(), image, scales=(0.5, 1.5))
    assert out.shape == (1, 4, 11, 17)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(1), torch.ones(1, 11, 17))
    with_flip = tta(seg_model().eval(), image, scales=(1.0,), flip=True)
    no_flip = tta(seg_model().eval(), image, scales=(1.0,), flip=False)
    assert not torch.allclose(with_flip, no_flip)  # the flip view is really used
