"""The decode path: format allowlist, pixel cap from the header, frames, EXIF, modes, corrupt data."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pillow_heif
import pytest
from PIL import Image

from app.engine.imaging import decode_image, sniff_format
from app.errors import CorruptImage, EmptyBody, TooManyPixels, UnsupportedFormat
from tests.helpers import encode, product_image

MAX = 40_000_000


def test_sniffs_the_allowed_formats() -> None:
    pillow_heif.register_heif_opener()  # to write HEIC
    img = product_image("red-apple", 0)
    for fmt in ("JPEG", "PNG", "WEBP", "HEIF", "AVIF", "GIF"):
        assert sniff_format(encode(img, fmt)) == fmt


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "PDF", "ICO", "TGA"])
def test_other_formats_are_unsupported(fmt: str) -> None:
    data = encode(product_image("red-apple", 0), fmt)
    with pytest.raises(UnsupportedFormat):
        decode_image(data, max_pixels=MAX)


@pytest.mark.parametrize("data", [b"<html><body>hi</body></html>", b"PK\x03\x04zipzip", bytes(range(256))])
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedFormat):
        decode_image(data, max_pixels=MAX)


def test_empty_body() -> None:
    with pytest.raises(EmptyBody):
        decode_image(b"", max_pixels=MAX)


def test_truncated_jpeg_is_corrupt() -> None:
    data = encode(product_image("red-apple", 0), "JPEG")
    with pytest.raises(CorruptImage):
        decode_image(data[: len(data) // 2], max_pixels=MAX)


def test_crc_broken_png_is_corrupt() -> None:
    data = bytearray(encode(product_image("red-apple", 0), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # flip a byte of compressed data: the chunk CRC no longer matches
    with pytest.raises(CorruptImage):
        decode_image(bytes(data), max_pixels=MAX)


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge size: signature, IHDR, one small IDAT, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_cap_is_read_from_the_header() -> None:
    data = _png_header_only(30000, 30000)
    assert len(data) < 200
    with pytest.raises(TooManyPixels):
        decode_image(data, max_pixels=MAX)


def test_pixel_cap_boundary() -> None:
    img = Image.new("RGB", (100, 50), (10, 20, 30))
    assert decode_image(encode(img, "PNG"), max_pixels=5000).size == (100, 50)
    with pytest.raises(TooManyPixels):
        decode_image(encode(img, "PNG"), max_pixels=4999)


def test_png_sent_with_any_name_is_sniffed() -> None:
    img = decode_image(encode(product_image("blue-milk", 1), "PNG"), max_pixels=MAX)
    assert img.mode == "RGB"


@pytest.mark.parametrize(
    "image",
    [
        Image.new("CMYK", (40, 30), (0, 255, 255, 0)),
        Image.new("L", (40, 30), 128),
        Image.new("1", (40, 30), 1),
        Image.new("LA", (40, 30), (100, 128)),
        Image.new("RGBA", (40, 30), (0, 0, 0, 0)),
        Image.new("P", (40, 30), 3),
        Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)),
    ],
    ids=["cmyk", "gray", "1bit", "la", "transparent-rgba", "palette", "16bit"],
)
def test_every_mode_becomes_rgb(image: Image.Image) -> None:
    fmt = "JPEG" if image.mode in ("CMYK", "L") else "PNG"
    out = decode_image(encode(image, fmt), max_pixels=MAX)
    assert out.mode == "RGB" and out.size == (40, 30)


def test_transparent_pixels_are_composited_on_white() -> None:
    out = decode_image(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), max_pixels=MAX)
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_16bit_is_rescaled_not_clipped() -> None:
    out = decode_image(encode(Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)), "PNG"), max_pixels=MAX)
    assert out.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), max_pixels=MAX)
    assert out.size == (20, 60)


def test_animated_webp_decodes_first_frame_only() -> None:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    out = decode_image(buf.getvalue(), max_pixels=MAX)
    r, _g, b = out.getpixel((16, 16))  # type: ignore[misc]
    assert r > 200 and b < 50


def test_jpeg_draft_keeps_the_requested_side() -> None:
    big = Image.new("RGB", (1600, 1200), (10, 200, 30))
    out = decode_image(encode(big, "JPEG"), max_pixels=MAX, min_side=288)
    assert min(out.size) >= 288 and out.size[0] < 1600
