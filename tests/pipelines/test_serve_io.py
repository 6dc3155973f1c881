"""The serving app's input checks and PNG encoders, without a server."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
from PIL import Image

from pipelines.serve.http_io import InputError, decode_image, image_bytes, mask_png, read_body


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def declared_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def status_of(fn, *args) -> tuple[int, str]:
    with pytest.raises(InputError) as info:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            asyncio.run(result)
    return info.value.status, info.value.code


def test_read_body_limits_with_and_without_content_length() -> None:
    assert asyncio.run(read_body({}, chunks(b"ab", b"cd"), 4)) == b"abcd"
    # No Content-Length (chunked upload): refused while reading, at the first byte too many.
    assert status_of(read_body, {}, chunks(b"abc", b"de"), 4) == (413, "body_too_large")
    assert status_of(read_body, {"content-length": "5"}, chunks(), 4) == (413, "body_too_large")
    assert status_of(read_body, {"content-length": "x"}, chunks(b"a"), 4)[0] == 400
    assert status_of(read_body, {}, chunks(), 4) == (400, "empty_body")


def test_image_bytes_accepts_raw_and_multipart_only() -> None:
    raw = asyncio.run(image_bytes({"content-type": "image/png"}, b"data"))
    assert raw == b"data"
    octets = asyncio.run(image_bytes({"content-type": "application/octet-stream"}, b"data"))
    assert octets == b"data"
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\nPIXELS\r\n"
        f"--{boundary}--\r\n"
    ).encode()
    form = {"content-type": f"multipart/form-data; boundary={boundary}"}
    assert asyncio.run(image_bytes(form, body)) == b"PIXELS"
    assert status_of(image_bytes, form, body.replace(b'"file"', b'"other"')) == (
        400,
        "missing_file",
    )
    assert status_of(image_bytes, {"content-type": "text/plain"}, b"x")[0] == 415
    assert status_of(image_bytes, {}, b"x")[0] == 415


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x00garbage" * 8, 400),
        (png(Image.new("RGB", (64, 64)), "JPEG")[:200], 400),  # truncated
        (declared_png(0, 0), 400),
        (declared_png(50_000, 50_000), 413),  # 2.5 G pixels declared in 60 bytes
        (png(Image.new("RGB", (101, 100))), 413),  # just over the limit
        (png(Image.new("RGB", (8, 8)), "PPM"), 415),  # an image, not an accepted format
    ],
)
def test_decode_image_rejects(data: bytes, status: int) -> None:
    assert status_of(decode_image, data, 100 * 100)[0] == status


def test_decode_image_converts_mode_and_keeps_pixels() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = decode_image(png(Image.fromarray(rgb)), 100)
    assert out.mode == "RGB" and out.size == (7, 5)
    np.testing.assert_array_equal(np.asarray(out), rgb)
    gray = decode_image(png(Image.fromarray(rgb)), 100, mode="L")
    assert gray.mode == "L" and gray.size == (7, 5)
    assert decode_image(png(Image.fromarray(rgb[..., 0])), 100).mode == "RGB"


@pytest.mark.parametrize("num_classes", [3, 300])
def test_mask_png_round_trips_class_ids(num_classes: int) -> None:
    mask = np.random.default_rng(1).integers(0, num_classes, (6, 9))
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(mask_png(mask, num_classes)))))
    np.testing.assert_array_equal(decoded, mask)
