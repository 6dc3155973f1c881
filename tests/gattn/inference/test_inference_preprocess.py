"""The one preprocessing path: floats, normalisation, antialiased resize; any input form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from gattn.inference import InputTransform, model_input, resize_input


def photo(h: int = 29, w: int = 37, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def reference(array: np.ndarray, size, mean=None, std=None, antialias=True) -> torch.Tensor:
    """Written out with plain torch: /255, normalise, bilinear resize."""
    x = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    if mean is not None:
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return F.interpolate(
        x[None], size=size, mode="bilinear", align_corners=False, antialias=antialias
    )[0]


def test_pil_array_and_tensor_give_the_same_antialiased_input() -> None:
    array = photo()
    forms = [Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1)]
    inputs = [model_input(f, (16, 20)) for f in forms]
    for x in inputs:
        assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (3, 16, 20)
        assert torch.equal(x, inputs[0])
    torch.testing.assert_close(inputs[0], reference(array, (16, 20)), rtol=0, atol=1e-6)
    # Antialiasing is on: without it a downscaled input differs visibly.
    assert (inputs[0] - reference(array, (16, 20), antialias=False)).abs().max() > 0.05


def test_normalisation_and_no_resize() -> None:
    array = photo()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    x = model_input(Image.fromarray(array), (16, 20), mean, std)
    torch.testing.assert_close(x, reference(array, (16, 20), mean, std), rtol=0, atol=1e-5)
    whole = model_input(array)
    assert whole.shape == (3, 29, 37)
    torch.testing.assert_close(whole, torch.from_numpy(array).permute(2, 0, 1) / 255)
    assert torch.equal(model_input(array, (29, 37)), whole)  # at its size: untouched


def test_resize_does_not_depend_on_the_batch() -> None:
    batch = torch.stack([model_input(photo(seed=s)) for s in range(4)])
    together = resize_input(batch, (16, 20))
    for i in range(4):
        assert torch.equal(together[i], resize_input(batch[i : i + 1], (16, 20))[0])


def test_transform_for_data_sets() -> None:
    array = photo()
    mask = torch.from_numpy(np.random.default_rng(1).integers(0, 4, (29, 37), dtype=np.uint8))
    t = InputTransform((16, 20))
    x, m = t(tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1)), tv_tensors.Mask(mask))
    assert torch.equal(x, model_input(array, (16, 20)))
    # Masks are resized nearest, as torchvision resizes a Mask: class ids are kept.
    expected = v2.Resize((16, 20), interpolation=InterpolationMode.NEAREST)(tv_tensors.Mask(mask))
    assert torch.equal(m, expected.as_subclass(torch.Tensor)) and m.dtype == torch.uint8
    assert torch.equal(t(array), x)  # classification samples: the image only
    x, m = InputTransform()(array, mask)
    assert x.shape == (3, 29, 37) and m is mask
    with pytest.raises(ValueError, match="both mean and std"):
        InputTransform((16, 20), mean=(0.5, 0.5, 0.5))
