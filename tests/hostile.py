"""Hostile images made in the test, small on the wire and costly to decode: each class of issue 16's bombs."""

from __future__ import annotations

import io
import re
import struct

import numpy as np
from PIL import Image

_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def progressive_jpeg(w: int, h: int, *, seed: int = 0, flat: bool = False) -> bytes:
    """Noise (a costly photo) or one flat colour (tiny on the wire at any size)."""
    if flat:
        image = Image.new("RGB", (w, h), (120, 130, 90))
    else:
        image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG", progressive=True, quality=80)
    return buf.getvalue()


def _scan_spans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every start-of-scan segment with its entropy-coded data."""
    spans, i = [], 2
    while i + 4 <= len(data) and data[i + 1] != 0xD9:
        j = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if data[i + 1] == 0xDA:
            m = _MARKER.search(data, j)
            assert m is not None
            spans.append((i, m.start()))
            j = m.start()
        i = j
    return spans


def scan_bomb(w: int = 128, h: int = 128, repeats: int = 300, *, flat: bool = False) -> bytes:
    """A progressive JPEG whose last scan is repeated: every repeat is one more pass over the coefficients."""
    data = progressive_jpeg(w, h, flat=flat)
    start, end = _scan_spans(data)[-1]
    return data[:end] + data[start:end] * repeats + data[end:]


def segment_bomb(segments: int = 2000) -> bytes:
    """A small baseline JPEG with thousands of empty application segments before its frame."""
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (90, 120, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    app9 = b"\xff\xe9" + struct.pack(">H", 4) + b"xx"
    return data[:2] + app9 * segments + data[2:]


def sixteen_bit_png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((h, w), 40000, dtype=np.uint16)).save(buf, "PNG", compress_level=9)
    return buf.getvalue()


def animated_webp(w: int, h: int, frames: int = 2) -> bytes:
    images = [Image.new("RGB", (w, h), (i * 60 % 255, 90, 30)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "WEBP", save_all=True, append_images=images[1:], lossless=True, quality=0, method=0)
    return buf.getvalue()


def exif_warning_jpeg(tags: int = 2000) -> bytes:
    """A JPEG whose EXIF block holds `tags` entries each claiming 1 GiB of data: Pillow warns once per entry."""
    entries = b"".join(struct.pack("<HHII", 0x9000 + (i % 0x0FFF), 4, 2**28, 8) for i in range(tags))
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", tags) + entries + b"\x00\x00\x00\x00"
    exif = b"Exif\x00\x00" + tiff
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    return data[:2] + app1 + data[2:]


# --- phone formats and GIF (issue 19) ---------------------------------------------------------------------------
def gif_screen(w: int, h: int, *, frame: tuple[int, int, int, int] = (0, 0, 1, 1), disposal: int = 0) -> bytes:
    """A tiny GIF: a logical screen of w x h and one frame at (left, top, width, height) with one byte of pixel
    data; a frame reaching past the screen grows Pillow's canvas to it."""
    gce = b"!\xf9\x04" + bytes([disposal << 2]) + b"\x00\x00\x00\x00"
    descriptor = b"," + struct.pack("<HHHH", *frame) + b"\x00"
    pixels = b"\x02\x02\x44\x01\x00"  # LZW minimum code size 2, one sub-block, terminator
    palette = b"\xff\x00\x00\x00\x00\xff"  # two colours
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x80\x00\x00" + palette + gce + descriptor + pixels + b";"


def gif_extension_flood(blocks: int) -> bytes:
    """A small GIF with `blocks` one-byte comment sub-blocks before its frame: a Python step each in Pillow."""
    buf = io.BytesIO()
    Image.new("P", (8, 8), 1).save(buf, "GIF")
    data = buf.getvalue()
    frame = data.index(b",")
    return data[:frame] + b"!\xfe" + b"\x01x" * blocks + b"\x00" + data[frame:]


def many_frame_gif(frames: int, size: tuple[int, int] = (16, 16)) -> bytes:
    images = [Image.new("RGB", size, (255, 0, 0))] + [Image.new("RGB", size, (0, 0, i % 256)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], optimize=False)
    return buf.getvalue()


def _restate_ispe(data: bytes, old: tuple[int, int], new: tuple[int, int]) -> bytes:
    """Every `ispe` property of size `old` rewritten to say `new` (the pixels stay as they are)."""
    out, start = bytearray(data), 0
    while (i := data.find(b"ispe", start)) >= 0:
        if struct.unpack(">II", data[i + 8 : i + 16]) == old:
            out[i + 8 : i + 16] = struct.pack(">II", *new)
        start = i + 4
    return bytes(out)


def avif_understated(side: int, claimed: int = 64) -> bytes:
    """An AVIF whose header (`ispe`) says claimed x claimed around an AV1 frame of side x side: libavif decodes
    the frame at its own size (1,096 bytes made an 8000x8000 decode, +139 MB)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 30, 200)).save(buf, "AVIF", quality=30, speed=10)
    return _restate_ispe(buf.getvalue(), (side, side), (claimed, claimed))


def heic_grid_understated(side: int = 1024, tile: int = 512, claimed: int = 64) -> bytes:
    """A HEIC grid whose `ispe` says claimed x claimed while its grid descriptor keeps side x side: libheif
    decodes the whole grid before comparing (a 4096^2 grid: +28 MB, then refused)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    previous, pillow_heif.options.GRID_TILE_SIZE = pillow_heif.options.GRID_TILE_SIZE, tile
    try:
        buf = io.BytesIO()
        Image.new("RGB", (side, side), (120, 30, 200)).save(buf, "HEIF", quality=30)
    finally:
        pillow_heif.options.GRID_TILE_SIZE = previous
    return _restate_ispe(buf.getvalue(), (side, side), (claimed, claimed))
