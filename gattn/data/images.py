"""Images as users have them, to the pixels a model takes: one conversion for every reader.

Photos come in many forms: greyscale (``L``), with alpha (``LA``, ``RGBA``, ``PA``), palette
(``P``, with or without a transparent index), print (``CMYK``), 16-bit (``I;16`` PNG/TIFF, or
``I`` in older Pillow), and phone pictures stored sideways with an EXIF ``Orientation`` tag.
PIL's ``convert`` alone gets two of these wrong: it clips 16-bit values at 255 (a 16-bit
photo becomes almost all white) and ignores the orientation tag (the model sees the photo on
its side, and a mask drawn on the upright photo no longer fits it).

:func:`to_mode` is the one conversion: orientation applied first (as every viewer and
annotation tool shows the image), then 16-bit values scaled to 8 bits (``v >> 8``), then PIL's
conversion to ``RGB`` or ``L`` (alpha dropped, palette expanded, CMYK converted), so the data
sets (:mod:`gattn.data.datasets`), the ``prepare`` stage's report and the serving app's decoder
see the same pixels for the same file. Images of any size are kept at their size: resizing is
the transforms' job.

Files are read through their path object (:func:`as_path`, :func:`open_file`): a
``pathlib.Path``, or any object with its API for another file system (``upath.UPath`` of an
``s3://`` or ``gs://`` folder, over fsspec), so the data sets read object storage as they read
a disk, without this library depending on it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, cast

import numpy as np
from PIL import Image, ImageOps

__all__ = ["HIGH_BIT_MODES", "as_path", "open_file", "open_image", "oriented_size", "to_mode"]

HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # integer modes wider than 8 bits
_ORIENTATION = 0x0112  # EXIF tag
_SWAPS_SIDES = (5, 6, 7, 8)  # orientations that turn the image by 90 degrees


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation still to apply (1: upright). PIL turns TIFFs itself (its size is
    already upright). A PNG whose header has no EXIF is read as upright until decoded: PIL
    would decode the whole file to look for EXIF after the pixels."""
    if image.format == "TIFF" or (image.format == "PNG" and "exif" not in image.info):
        return 1
    try:
        return int(image.getexif().get(_ORIENTATION, 1) or 1)
    except (OSError, SyntaxError, ValueError, TypeError):  # a corrupt EXIF block: leave it
        return 1


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """``(width, height)`` of ``image`` as shown (after its EXIF orientation), from the header
    alone (nothing decoded)."""
    width, height = image.size
    return (height, width) if _orientation(image) in _SWAPS_SIDES else (width, height)


def _to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) greyscale image as ``L``, values scaled by 1/256."""
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), mode="L")


def to_mode(image: Image.Image, mode: str = "RGB") -> Image.Image:
    """``image`` upright (EXIF orientation applied) and in ``mode``, at its own size.

    Args:
        image: Any PIL image (it is not modified).
        mode: ``"RGB"`` (3 channels) or ``"L"`` (1 channel), the model's input channels.

    Returns:
        A new image in ``mode``: alpha dropped, palettes expanded, CMYK converted, 16-bit
        values scaled to 8 bits.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode={mode!r} is invalid, expected 'RGB' or 'L'")
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in HIGH_BIT_MODES:
        image = _to_8bit(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns on P -> RGB with a transparent index
    return image if image.mode == mode else image.convert(mode)


def as_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a ``pathlib.Path``; a path object of another file system (one with
    ``iterdir``, such as ``upath.UPath``) as it is, typed as the ``Path`` API it has."""
    return cast(Path, path) if hasattr(path, "iterdir") else Path(path)


@contextmanager
def open_file(path: str | os.PathLike[str]) -> Iterator[Image.Image]:
    """The image file at ``path`` opened lazily (header read, pixels not decoded), on any file
    system :func:`as_path` takes; closed on exit."""
    with as_path(path).open("rb") as f, Image.open(f) as image:
        yield image


def open_image(
    path: str | os.PathLike[str] | IO[bytes], mode: str = "RGB", min_side: int | None = None
) -> Image.Image:
    """Open, decode and convert an image file with :func:`to_mode`.

    The file is decoded from its bytes in memory, as the serving app decodes an upload: PIL
    memory-maps an uncompressed TIFF opened by name and then loses its EXIF rotation (Pillow
    13), so the same file would differ between training and serving.

    With ``min_side``, a JPEG is decoded at the smallest of its 1/2, 1/4, 1/8 scales whose
    sides are both at least ``min_side`` (PIL's ``draft``: the decoder skips the finest
    detail, several times faster for a photo that is resized down next); other formats
    decode whole.
    """
    if not hasattr(path, "read"):
        path = io.BytesIO(as_path(path).read_bytes())
    with Image.open(path) as image:
        if min_side is not None and image.format == "JPEG":
            image.draft(None, (min_side, min_side))
        image.load()
        out = to_mode(image, mode)
        return out.copy() if out is image else out  # the file's image is closed on return
