"""Untrusted HTTP input to a checked image, and results to PNG: the serving app's edge.

Every way an upload can be wrong is an :class:`InputError` with a 4xx status and a message
that says what was wrong and what is accepted, so the app answers with JSON and keeps serving:

- the body is over ``max_body_bytes`` (checked on ``Content-Length`` and while reading), or
  empty (413, 400);
- the content type is neither ``image/*``, ``application/octet-stream`` nor a
  ``multipart/form-data`` upload with a ``file`` part (415);
- the bytes are not an image of an accepted format, or are truncated or corrupt (400, 415);
- the image is 0 pixels wide or high (400), or has more than ``max_pixels`` pixels (413).
  The pixel count is read from the *header*, before anything is decoded, so a small file
  that declares huge dimensions (a decompression bomb) costs nothing; PIL's own
  ``DecompressionBombError`` is mapped to the same answer as a second line of defence.
"""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from gattn.data.images import to_mode

FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # PIL format names accepted
RAW_TYPES = ("application/octet-stream",)  # besides image/*
UPLOAD_FIELD = "file"  # the multipart part holding the image
# What PIL raises on truncated or corrupt data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError)


class InputError(Exception):
    """A bad request: ``status`` (4xx), a short machine-readable ``code`` and a ``detail``."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def payload(self) -> dict[str, str]:
        """The JSON body of the error response."""
        return {"error": self.code, "detail": self.detail}


def _too_large(limit: int) -> InputError:
    return InputError(413, "body_too_large", f"request body exceeds {limit} bytes (max_body_bytes)")


async def read_body(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, refused as soon as it is known to exceed ``limit`` bytes.

    Args:
        headers: Request headers (``content-length`` is checked first when present).
        chunks: The body as it arrives (Starlette's ``request.stream()``).
        limit: Largest accepted body in bytes.

    Raises:
        InputError: 413 over the limit, 400 for an empty body or a malformed length.
    """
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise InputError(400, "bad_content_length", f"invalid Content-Length {length!r}")
        if int(length) > limit:
            raise _too_large(limit)
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    if not body:
        raise InputError(400, "empty_body", "the request body is empty; send an image")
    return bytes(body)


async def _once(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


async def image_bytes(headers: Mapping[str, str], body: bytes) -> bytes:
    """The image bytes of a request: the raw body (``image/*``, ``application/octet-stream``)
    or the ``file`` part of a ``multipart/form-data`` upload.

    Raises:
        InputError: 415 for another content type, 400 for a malformed or empty upload.
    """
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype.startswith("image/") or ctype in RAW_TYPES:
        return body
    if ctype != "multipart/form-data":
        raise InputError(
            415,
            "unsupported_media_type",
            f"content type {ctype or '(none)'!r} is not accepted; send the image as the body "
            f"with Content-Type image/png, image/jpeg, ... or as a multipart/form-data upload "
            f"in a {UPLOAD_FIELD!r} field",
        )
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    parser = MultiPartParser(Headers(headers), _once(body), max_files=1, max_fields=16)
    try:
        form = await parser.parse()
    except MultiPartException as err:
        raise InputError(400, "bad_multipart", f"malformed multipart body: {err.message}") from None
    part = form.get(UPLOAD_FIELD)
    if not isinstance(part, UploadFile):
        raise InputError(
            400, "missing_file", f"multipart upload has no file in the {UPLOAD_FIELD!r} field"
        )
    try:
        data = await part.read()
    finally:
        await form.close()
    if not data:
        raise InputError(400, "empty_body", f"the uploaded {UPLOAD_FIELD!r} file is empty")
    return data


def decode_image(data: bytes, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode an uploaded image into ``mode`` after checking its header dimensions.

    The pixels are the ones training saw for the same file (:func:`gattn.data.to_mode`: EXIF
    orientation applied, then greyscale, alpha, palette, CMYK or 16-bit images converted), at
    the image's own size.

    Args:
        data: The encoded image.
        max_pixels: Largest accepted ``width * height``, checked before decoding.
        mode: PIL mode of the result (``"RGB"`` or ``"L"``, the model's input channels).

    Raises:
        InputError: 415 for a format not in :data:`FORMATS`, 400 for bytes that are no image,
            a truncated or corrupt one, or zero width or height; 413 over ``max_pixels``.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        try:
            other = Image.open(io.BytesIO(data)).format
        except (UnidentifiedImageError, *_DECODE_ERRORS, Image.DecompressionBombError):
            other = None
        if other:
            raise InputError(
                415, "unsupported_format", f"{other} images are not accepted; send {FORMATS}"
            ) from None
        raise InputError(
            400, "not_an_image", f"the body is not a decodable image (expected one of {FORMATS})"
        ) from None
    except Image.DecompressionBombError as err:
        raise InputError(413, "too_many_pixels", str(err)) from None
    except _DECODE_ERRORS as err:
        raise InputError(400, "corrupt_image", f"cannot read the image header: {err}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise InputError(400, "empty_image", f"the image is {width}x{height} pixels")
        if width * height > max_pixels:
            raise InputError(
                413,
                "too_many_pixels",
                f"the image is {width}x{height} = {width * height} pixels, more than the "
                f"{max_pixels} allowed (max_pixels); send a smaller image",
            )
        try:
            image.load()
            out = to_mode(image, mode)
            return out.copy() if out is image else out  # `image` is closed on return
        except Image.DecompressionBombError as err:
            raise InputError(413, "too_many_pixels", str(err)) from None
        except _DECODE_ERRORS as err:
            raise InputError(
                400, "corrupt_image", f"the {image.format} image is truncated or corrupt: {err}"
            ) from None


def _palette() -> list[int]:
    """A 256-entry PNG palette: class 0 black, then matplotlib's tab10 colours, repeated."""
    import matplotlib

    tab10 = [
        tuple(round(255 * c) for c in rgba[:3]) for rgba in matplotlib.colormaps["tab10"](range(10))
    ]
    colours = [(0, 0, 0)] + [tab10[i % 10] for i in range(255)]
    return [v for rgb in colours for v in rgb]


def png_base64(image: Image.Image) -> str:
    """``image`` encoded as PNG, in base64 text."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def mask_png(mask: np.ndarray, num_classes: int) -> str:
    """A class-id mask ``(H, W)`` as a base64 palette PNG: pixel values are the class ids (read
    it back with ``np.asarray(Image.open(...))``) and viewers show them in colour."""
    if num_classes > 256:
        return png_base64(Image.fromarray(mask.astype(np.uint16)))  # 16-bit grey, no colours
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(_palette())  # "L" becomes "P" with the same values
    return png_base64(image)


def heatmap_png(image: Image.Image, heat: np.ndarray, alpha: float = 0.5) -> str:
    """A ``[0, 1]`` map (any size) in the jet colour map over ``image``, as base64 PNG."""
    import matplotlib

    width, height = image.size
    heat_image = Image.fromarray(np.clip(heat * 255.0, 0, 255).astype(np.uint8))
    heat = (
        np.asarray(heat_image.resize((width, height), Image.Resampling.BILINEAR), np.float32)
        / 255.0
    )
    colour = matplotlib.colormaps["jet"](heat)[..., :3]
    base = np.asarray(image.convert("RGB"), np.float32) / 255.0
    blend = (1 - alpha) * base + alpha * colour
    return png_base64(Image.fromarray(np.round(blend * 255).astype(np.uint8)))
