"""Fuzzing the decode path (sniff -> Pillow -> RGB -> model preprocessing) with hypothesis: random bytes and
valid JPEG/PNG/WebP/HEIC/AVIF/GIF files mutated by bit flips, truncation, splices and header edits. Anything but
the service's own error family (CorruptImage, UnsupportedFormat, TooManyPixels, ImageTooComplex, EmptyBody) is a
failure, and whatever decodes must come out as a finite model input.

CI runs a bounded number of examples; run it long with, e.g.:
    VPS_FUZZ_EXAMPLES=200000 pytest tests/unit/test_fuzz_decode.py
"""

from __future__ import annotations

import io
import os

import numpy as np
import pillow_heif
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.engine.embedding import ModelInput, decode_side, preprocess
from app.engine.imaging import decode_image
from app.errors import CorruptImage, EmptyBody, ImageTooComplex, TooManyPixels, UnsupportedFormat

EXAMPLES = int(os.environ.get("VPS_FUZZ_EXAMPLES", "400"))
EXPECTED = (CorruptImage, UnsupportedFormat, TooManyPixels, ImageTooComplex, EmptyBody)
SPEC = ModelInput(name="images", size=32, resize_to=40, mean=(127.0,) * 3, std=(128.0,) * 3)
MAX_PIXELS = 4_000_000
pillow_heif.register_heif_opener()  # to write the HEIC seeds


def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for mode, fmt, kw in [
        ("RGB", "JPEG", {"quality": 80}),
        ("RGB", "JPEG", {"quality": 80, "progressive": True}),
        ("L", "JPEG", {}),
        ("CMYK", "JPEG", {}),
        ("RGB", "PNG", {}),
        ("RGBA", "PNG", {}),
        ("P", "PNG", {"transparency": 0}),
        ("I;16", "PNG", {}),
        ("RGB", "WEBP", {"quality": 70}),
        ("RGBA", "WEBP", {"lossless": True}),
        ("RGB", "HEIF", {"quality": 50}),
        ("RGBA", "HEIF", {"quality": 50}),
        ("RGB", "AVIF", {"quality": 50, "speed": 10}),
        ("RGBA", "AVIF", {"quality": 50, "speed": 10}),
        ("P", "GIF", {"transparency": 0}),
        ("L", "GIF", {"optimize": False}),
    ]:
        arr = rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)
        image = Image.fromarray(arr).convert(mode if mode != "I;16" else "I").convert(mode)
        buf = io.BytesIO()
        image.save(buf, format=fmt, **kw)
        out.append(buf.getvalue())
    frames = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(4)]
    for fmt in ("PNG", "WEBP", "GIF", "AVIF", "HEIF"):  # animated (HEIF: two images)
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
        out.append(buf.getvalue())
    return out


SEEDS = _seed_files()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "splice", "set16", "insert", "delete"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            data[pos:pos] = draw(st.sampled_from(SEEDS))[: draw(st.integers(0, 64))]
        elif op == "set16":  # header fields: widths, heights, lengths
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, draw(st.integers(0, 0xFFFF))]))
            data[pos : pos + 2] = value.to_bytes(2, "big")
        elif op == "insert":
            data[pos:pos] = draw(st.binary(max_size=32))
        else:
            del data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


def _decode_or_expected_error(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=MAX_PIXELS, min_side=decode_side(SPEC))
    except EXPECTED:
        return
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    tensor = preprocess(image, SPEC)
    assert tensor.shape == (3, 32, 32) and np.isfinite(tensor).all()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(mutated())
def test_mutated_images_decode_or_fail_cleanly(data: bytes) -> None:
    _decode_or_expected_error(data)


@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.binary(max_size=4096))
def test_random_bytes_decode_or_fail_cleanly(data: bytes) -> None:
    _decode_or_expected_error(data)


@settings(max_examples=EXAMPLES // 4, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    st.sampled_from(
        [
            b"\xff\xd8\xff",
            b"\x89PNG\r\n\x1a\n",
            b"RIFF\x00\x00\x00\x00WEBPVP8 ",
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
            b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",
            b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00mif1avis",
            b"GIF89a",
            b"GIF87a",
        ]
    ),
    st.binary(max_size=512),
)
def test_valid_magic_with_garbage_fails_cleanly(magic: bytes, rest: bytes) -> None:
    _decode_or_expected_error(magic + rest)
