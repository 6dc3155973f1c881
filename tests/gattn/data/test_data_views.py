"""Training views: joint image/mask geometry, multi-crop and multi-scale shapes, MAE input."""

from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from gattn.data.views import (
    MultiCropViews,
    MultiScaleViews,
    mae_view,
    seg_eval_transform,
    seg_train_transform,
    to_float,
)


def _blocky(h: int = 40, w: int = 48, seed: int = 0) -> tv_tensors.Image:
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, h // 4, w // 4), generator=g, dtype=torch.uint8)
    return tv_tensors.Image(small.repeat_interleave(4, 1).repeat_interleave(4, 2))


def _rule(image_u8: torch.Tensor) -> torch.Tensor:
    """A mask derived from the image pixel by pixel."""
    return (image_u8[0] // 64).long()


def _to_u8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().to(torch.uint8)


def test_joint_transform_keeps_mask_on_the_image() -> None:
    image = _blocky()
    mask = tv_tensors.Mask(_rule(image).to(torch.uint8))
    t = seg_train_transform(
        24, scale=(0.1, 1.0), vflip=True, interpolation=InterpolationMode.NEAREST
    )
    outputs = []
    for seed in range(20):
        torch.manual_seed(seed)
        out_image, out_mask = t(image, mask)
        assert out_image.shape == (3, 24, 24) and out_mask.shape == (24, 24)
        assert torch.equal(out_mask.long(), _rule(_to_u8(out_image)))
        outputs.append(out_mask)
    assert len({m.numpy().tobytes() for m in outputs}) > 10  # the geometry is random


def test_joint_transform_resizes_masks_nearest_with_a_smooth_image() -> None:
    image = _blocky(seed=1)
    mask = tv_tensors.Mask((_rule(image) * 50).to(torch.uint8))  # values {0, 50, 100, 150}
    t = seg_train_transform(32, scale=(0.1, 0.3))  # strong up-sampling, bilinear image
    agree, control = [], []
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out_mask = t(image, mask)
        assert set(out_mask.unique().tolist()) <= {0, 50, 100, 150}  # never blended
        expected = _rule(_to_u8(out_image)) * 50  # differs only where bilinear blends edges
        agree.append((out_mask.long() == expected).float().mean())
        control.append((out_mask.long().flip(-1) == expected).float().mean())
    assert torch.stack(agree).mean() > 0.7 > 0.5 > torch.stack(control).mean()


def test_seg_eval_transform_resizes_jointly() -> None:
    image = _blocky()
    mask = tv_tensors.Mask(_rule(image).to(torch.uint8))
    out_image, out_mask = seg_eval_transform(20)(image, mask)
    assert out_image.shape == (3, 20, 20) and out_mask.dtype == torch.uint8
    out_image, out_mask = seg_eval_transform()(image, mask)
    assert torch.equal(out_mask, mask) and torch.equal(_to_u8(out_image), image)


def test_multi_crop_gives_two_global_and_n_local_views() -> None:
    image = _blocky()
    views = MultiCropViews(global_size=32, local_size=12, n_local=5)
    globals_, locals_ = views(image)
    assert [tuple(v.shape) for v in globals_] == [(3, 32, 32)] * 2
    assert [tuple(v.shape) for v in locals_] == [(3, 12, 12)] * 5
    assert all(v.dtype == torch.float32 and v.min() >= 0 and v.max() <= 1 for v in globals_)


def test_multi_crop_scale_is_honoured() -> None:
    image = _blocky(48, 48)
    whole = TF.resize(image, [16, 16]).float() / 255
    views = MultiCropViews(16, 8, n_local=1, global_scale=(1.0, 1.0), color_jitter=0.0)
    for view in views(image)[0]:  # a full-area crop is the whole image, maybe flipped
        assert torch.allclose(view, whole, atol=1e-6) or torch.allclose(
            view, whole.flip(-1), atol=1e-6
        )


def test_multi_scale_views() -> None:
    image = _blocky(48, 48)
    global_view, local_views = MultiScaleViews(32, 16, scales=(0.25, 0.5, 1.0))(image)
    assert torch.allclose(global_view, TF.resize(image, [32, 32]).float() / 255)
    assert [tuple(v.shape) for v in local_views] == [(3, 16, 16)] * 3
    assert torch.allclose(local_views[-1], TF.resize(image, [16, 16]).float() / 255)


def test_mae_view_normalises() -> None:
    view = mae_view(16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(_blocky())
    assert view.shape == (3, 16, 16) and view.min() >= -2 and view.max() <= 2
    assert view.min() < -1  # values below 0.25 land under -1 only if normalised


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: MultiCropViews(local_scale=(0.5, 0.1)), "local_scale"),
        (lambda: MultiCropViews(global_scale=(0.0, 1.0)), "global_scale"),
        (lambda: MultiScaleViews(scales=(1.5,)), "scales"),
        (lambda: mae_view(scale=(0.2, 2.0)), "scale"),
        (lambda: to_float(mean=(0.5,)), "mean and std"),
    ],
)
def test_bad_view_options_are_value_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()
