"""Images as users have them (issue 14): every mode and orientation gives the same pixels in
the data sets, the prepare stage's reader and the serving app's decoder, at the image's size."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gattn.data import ImageFolderDataset, SegmentationFolderDataset, open_image, to_mode
from gattn.data.datasets import DataLayoutError, infer_num_classes

H, W = 6, 10  # upright size: not square, so a missed rotation shows
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, (H, W), dtype=np.uint8)


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _rgba() -> tuple[Image.Image, np.ndarray]:
    alpha = np.where(GREY > 128, 255, 0).astype(np.uint8)
    return Image.fromarray(np.dstack([RGB, alpha]), "RGBA"), RGB


def _palette() -> tuple[Image.Image, np.ndarray]:
    image = Image.fromarray(RGB).quantize(16)
    return image, np.asarray(image.convert("RGB"))


def _palette_transparent() -> tuple[Image.Image, np.ndarray]:
    image, expected = _palette()
    image.info["transparency"] = 0
    return image, expected


def _sixteen_bit() -> tuple[Image.Image, np.ndarray]:
    values = GREY.astype(np.uint16) * 257 + 128  # full 16-bit range
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)
    return Image.fromarray(values), expected  # mode I;16


def _cmyk() -> tuple[Image.Image, np.ndarray]:
    image = Image.fromarray(RGB).convert("CMYK")
    return image, np.asarray(image.convert("RGB"))


# name -> (image to save, expected RGB pixels, file format, save options)
CASES: dict[str, tuple[Callable[[], tuple[Image.Image, np.ndarray]], str, dict]] = {
    "rgb": (lambda: (Image.fromarray(RGB), RGB), "PNG", {}),
    "grey": (lambda: (Image.fromarray(GREY), np.repeat(GREY[..., None], 3, 2)), "PNG", {}),
    "grey-alpha": (
        lambda: (Image.fromarray(np.dstack([GREY, GREY]), "LA"), np.repeat(GREY[..., None], 3, 2)),
        "PNG",
        {},
    ),
    "rgba": (_rgba, "PNG", {}),
    "palette": (_palette, "PNG", {}),
    "palette-transparent": (_palette_transparent, "PNG", {"transparency": 0}),
    "16-bit png": (_sixteen_bit, "PNG", {}),
    "16-bit tiff": (_sixteen_bit, "TIFF", {}),
    "cmyk tiff": (_cmyk, "TIFF", {}),
}


def _write(path: Path, name: str) -> np.ndarray:
    make, fmt, options = CASES[name]
    image, expected = make()
    image.save(path, format=fmt, **options)
    return expected


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_becomes_the_same_rgb_pixels(tmp_path: Path, name: str) -> None:
    expected = _write(tmp_path / "x.img", name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's palette-transparency warning
        got = np.asarray(open_image(tmp_path / "x.img"))
    assert got.shape == (H, W, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    grey = np.asarray(open_image(tmp_path / "x.img", "L"))
    assert grey.shape == (H, W)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.array([[0, 255, 256, 32768, 65535]], np.uint16))
    assert np.asarray(to_mode(image, "L")).tolist() == [[0, 0, 1, 128, 255]]


def test_cmyk_jpeg_decodes_to_rgb(tmp_path: Path) -> None:
    Image.new("CMYK", (W, H), (0, 255, 255, 0)).save(tmp_path / "x.jpg")  # red in print
    red = np.asarray(open_image(tmp_path / "x.jpg"))
    assert red.shape == (H, W, 3) and red[..., 0].min() > 200 and red[..., 1:].max() < 60


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, fmt: str, orientation: int) -> None:
    upright = np.zeros((H, W), np.uint8)
    upright[:2, :3] = 255  # a bright top-left corner
    turn = {
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }
    stored = Image.fromarray(upright).transpose(turn[orientation])  # what a camera writes
    path = tmp_path / f"x.{fmt.lower()}"
    stored.save(
        path, format=fmt, exif=_exif(orientation), **({"quality": 100} if fmt == "JPEG" else {})
    )
    got = np.asarray(open_image(path, "L")).astype(int)
    assert got.shape == (H, W)
    assert got[:2, :3].mean() > 200 and got[2:, 3:].mean() < 50


def _folder_cls(root: Path) -> dict[str, np.ndarray]:
    expected = {}
    for i, name in enumerate(CASES):
        cls = root / ("a" if i % 2 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        expected[name] = _write(cls / f"{i:02d}.{'tif' if 'tiff' in name else 'png'}", name)
    return expected


def test_image_folder_loads_every_mode_the_same_way_as_serving(tmp_path: Path) -> None:
    from pipelines.serve.http_io import decode_image

    expected = _folder_cls(tmp_path)
    ds = ImageFolderDataset(tmp_path)
    assert not ds.skipped and len(ds) == len(CASES)
    for i, (path, _) in enumerate(ds.samples):
        name = list(CASES)[int(Path(path).stem)]
        pixels = (ds[i][0] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(pixels, expected[name], err_msg=name)
        served = decode_image(Path(path).read_bytes(), 10_000, "RGB")
        np.testing.assert_array_equal(np.asarray(served), expected[name], err_msg=name)


def test_images_of_different_sizes_keep_their_size(tmp_path: Path) -> None:
    for i, (h, w) in enumerate([(6, 10), (25, 25), (40, 17)]):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.fromarray(np.full((h, w), i, np.uint8)).save(tmp_path / "a" / f"{i}.png")
    ds = ImageFolderDataset(tmp_path)
    assert [tuple(ds[i][0].shape) for i in range(3)] == [(3, 6, 10), (3, 25, 25), (3, 40, 17)]


def _seg_folder(root: Path, orientation: int | None = None) -> None:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((H, W), np.uint8)
    mask[:2, :3] = 2
    mask[-1, -1] = 255
    image = Image.fromarray(np.where(mask[..., None] == 2, RGB, 0).astype(np.uint8))
    if orientation is None:
        image.save(root / "images" / "a.png")
    else:  # the photo stored sideways with its EXIF tag; the mask drawn on the upright photo
        image.transpose(Image.Transpose.ROTATE_90).save(
            root / "images" / "a.jpg", exif=_exif(orientation), quality=100
        )
    Image.fromarray(mask).save(root / "masks" / "a.png")
    big = np.ones((9, 4), np.uint8)
    Image.fromarray(np.full((9, 4, 3), 200, np.uint8)).save(root / "images" / "b.png")
    Image.fromarray(big).save(root / "masks" / "b.png")


def test_segmentation_masks_fit_exif_rotated_photos(tmp_path: Path) -> None:
    _seg_folder(tmp_path, orientation=6)
    ds = SegmentationFolderDataset(tmp_path, num_classes=3)
    assert not ds.skipped
    image, mask = ds[0]
    assert image.shape == (3, H, W) and mask.shape == (H, W)
    assert image[:, :2, :3].mean() > image[:, 2:, 3:].mean()  # the photo's object over its mask


def test_num_classes_is_read_from_the_masks(tmp_path: Path) -> None:
    _seg_folder(tmp_path)
    ds = SegmentationFolderDataset(tmp_path, num_classes=None)
    assert ds.num_classes == 3  # values 0, 1, 2 (255 = ignore)
    assert [tuple(ds[i][1].shape) for i in range(2)] == [(H, W), (9, 4)]  # sizes kept
    Image.fromarray(np.zeros((H, W), np.uint8)).save(tmp_path / "masks" / "a.png")
    Image.fromarray(np.zeros((9, 4), np.uint8)).save(tmp_path / "masks" / "b.png")
    with pytest.raises(DataLayoutError, match="hold no class but 0"):
        infer_num_classes(sorted((tmp_path / "masks").iterdir()))


def test_serving_decodes_like_training(tmp_path: Path) -> None:
    from pipelines.serve.http_io import decode_image

    for name in CASES:
        buf = io.BytesIO()
        make, fmt, options = CASES[name]
        image, expected = make()
        image.save(buf, format=fmt, **options)
        got = decode_image(buf.getvalue(), 10_000, "RGB")
        assert got.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=name)


def test_a_large_jpeg_decodes_at_a_reduced_scale_when_asked(tmp_path: Path) -> None:
    """``min_side`` / ``decode_size``: a 256 x 200 JPEG decoded at 1/2 for 100 px (both sides
    stay at least 100), whole without it; a PNG always whole; the data set does the same."""
    pixels = np.random.default_rng(0).integers(0, 256, (200, 256, 3), dtype=np.uint8)
    (tmp_path / "c").mkdir()
    Image.fromarray(pixels).save(tmp_path / "c" / "a.jpg", quality=95)
    Image.fromarray(pixels).save(tmp_path / "c" / "b.png")
    assert open_image(tmp_path / "c" / "a.jpg", min_side=100).size == (128, 100)
    assert open_image(tmp_path / "c" / "a.jpg").size == (256, 200)
    assert open_image(tmp_path / "c" / "b.png", min_side=100).size == (256, 200)
    ds = ImageFolderDataset(tmp_path, decode_size=60)  # 1/4 would be 64 x 50: too small
    assert [tuple(ds[i][0].shape[-2:]) for i in range(2)] == [(100, 128), (200, 256)]
