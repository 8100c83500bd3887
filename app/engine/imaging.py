"""The one place that touches untrusted image bytes.

Format is sniffed from the bytes and only the matching Pillow plugin is allowed to parse them, so a file that
claims to be a JPEG never reaches the TIFF, PSD or PDF plugins. The pixel count is checked from the header before
any pixel is decoded; only the first frame of an animation is ever decoded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Final

import numpy as np
from PIL import Image

from app.errors import CorruptImage, EmptyBody, ImageTooComplex, Overloaded, TooManyPixels, UnsupportedFormat

JPEG: Final = "JPEG"
PNG: Final = "PNG"
WEBP: Final = "WEBP"


# A query's pixel cap, read from the header before decoding (the service's default; VPS_MAX_IMAGE_PIXELS).
MAX_IMAGE_PIXELS = 40_000_000


def sniff_format(data: bytes) -> str:
    """Return the image format from its magic bytes, or raise UnsupportedFormat."""
    if not data:
        raise EmptyBody()
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    raise UnsupportedFormat()


# JPEG structure, counted before decoding. Decode CPU grows with the number of scans (each progressive scan is a
# pass over the whole coefficient buffer: a 6000x6000 image with one scan repeated 1,000 times took 10.2 s of CPU,
# scripts/bench_hostile.py) and
# parsing with the number of segments. Encoders write 1 scan (baseline) or about 10 (libjpeg progressive).
MAX_JPEG_SCANS = 64
MAX_JPEG_SEGMENTS = 512
MAX_PNG_CHUNKS = 4096  # IDAT is usually split in 8-64 KiB chunks: a 10 MiB file has a few hundred
# Memory one decode may take, estimated from the header (canvas, bit depth, channels, progressive coefficients)
# before any pixel is decoded. By `decode_cost`'s rules 160 MiB admits a 40 MP JPEG, baseline (decoded at reduced
# scale) or progressive 4:2:0, a 20 MP RGB or RGBA PNG, a 27 MP 16-bit PNG, a 14 MP WebP (10 MP animated) and a
# 9.8 MP palette PNG (converted whole).
MAX_DECODE_BYTES = 160 * 1024 * 1024
# No side longer than this, whatever the pixel count (1 x 20,000 is answered, as it was; a 1 x 40,000,000 strip is
# not a photo).
MAX_SIDE = 32768
# A marker that ends entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a fill 0xFF or RSTn.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Pillow's storage per pixel: 1, 2 (16-bit), or 4 (RGB, LA and the like are stored in 4 bytes too).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# A large decode: it reserves room in the shared budget (smaller ones, every ordinary photo, never wait for it),
# and its freed memory is given back afterwards (release_memory).
LARGE_DECODE_BYTES = 32 * 1024 * 1024


def jpeg_structure(data: bytes) -> tuple[int, int]:
    """(scans, segments) of a JPEG, walking its markers without decoding; stops early past the limits. Bytes
    between segments that are not a marker are skipped to the next 0xFF, as libjpeg does (stopping there let one
    stray byte hide 5,000 scans)."""
    scans = segments = 0
    i, n = 2, len(data)
    while i + 4 <= n and scans <= MAX_JPEG_SCANS and segments <= MAX_JPEG_SEGMENTS:
        if data[i] != 0xFF:
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1  # fill byte
            continue
        if marker == 0xD9:
            break
        if 0xD0 <= marker <= 0xD7 or marker in (0x01, 0x00):
            i += 2
            continue
        segments += 1
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next real marker
            scans += 1
            m = _JPEG_MARKER.search(data, i)
            if m is None:
                break
            i = m.start()
    return scans, segments


def png_chunks(data: bytes) -> int:
    """Chunks of a PNG, walked from their lengths without decoding; stops past the limit. Pillow walks each one in
    Python (10 MB of empty private chunks: 1.6 s of CPU before the first pixel)."""
    chunks, i, n = 0, 8, len(data)
    while i + 8 <= n and chunks <= MAX_PNG_CHUNKS:
        chunks += 1
        if data[i + 4 : i + 8] == b"IEND":
            break
        i += 12 + int.from_bytes(data[i : i + 4], "big")
    return chunks


def decode_cost(opened: Image.Image, fmt: str, min_side: int | None, scans: int = 1) -> int:
    """Bytes the decode of `opened` will hold at its peak, from the header alone; on the safe side of what
    scripts/bench_hostile.py measured for each kind."""
    w, h = opened.size
    pixels = w * h
    if fmt == JPEG:
        scale = 1
        if min_side is not None:  # draft mode decodes at 1/2, 1/4 or 1/8 while both sides stay >= min_side
            while scale < 8 and min(w, h) // (scale * 2) >= min_side:
                scale *= 2
        out = (pixels // (scale * scale)) * 4 * 2  # the decoded image (4 bytes a pixel in Pillow) and its RGB copy
        if scans > 1 or opened.info.get("progressive") or opened.info.get("progression"):
            # More than one scan (progressive, or baseline with a scan per component): libjpeg keeps every
            # component's coefficients at full size, 2 bytes a sample (a 367-byte CMYK file: +308 MB).
            layers = getattr(opened, "layer", None) or [(0, 1, 1, 0)] * 4
            hmax = max(layer[1] for layer in layers)
            vmax = max(layer[2] for layer in layers)
            out += sum(2 * pixels * layer[1] * layer[2] // (hmax * vmax) for layer in layers)
        return out
    stored = _BYTES_PER_PIXEL.get(opened.mode, 4)
    if fmt == WEBP:
        stored = 8  # libwebp's canvas and Pillow's copy of it
    if getattr(opened, "n_frames", 1) > 1:
        stored += 4  # an animation decoder keeps the previous canvas too
    shrinks = min_side is not None and min(w, h) // (2 * min_side) >= 2 and opened.mode not in ("P", "1")
    # Reduced first: one full-size temporary at most (RGBa premultiplied). Converted whole: palette with
    # transparency goes through RGBA three times (+648 MB measured for a 6324^2 palette PNG).
    return pixels * (stored + (4 if shrinks else 16))


class DecodeBudget:
    """The decode memory of every request in flight, bounded: a decode that does not fit waits for none and is
    refused (503 `overloaded`, retryable), so a few large images cannot together exceed the pod's memory or keep
    every compute slot busy decoding. Thread-safe: the pool's threads share it."""

    def __init__(self, total_bytes: int) -> None:
        self.total = total_bytes
        self._used = 0
        self._lock = threading.Lock()

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        with self._lock:
            if self._used and self._used + nbytes > self.total:
                raise Overloaded("too many large images are being decoded; retry shortly")
            self._used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._used -= nbytes


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int | None = None,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    budget: DecodeBudget | None = None,
) -> Image.Image:
    """Decode untrusted bytes to an RGB image (first frame, EXIF orientation applied).

    Refused before any pixel is decoded: too many pixels or too long a side (TooManyPixels), too many JPEG scans
    or segments, or an estimated decode memory above `max_decode_bytes` (ImageTooComplex); `budget`, when given,
    bounds the decode memory of all requests together. `min_side` lets JPEG decode at a reduced scale (DCT draft
    mode) while keeping both sides >= min_side: a 12 MP photo bound for a 224-pixel model decodes about 2-3x
    faster that way. Library warnings are collected (`collect_warnings`), never printed.
    """
    fmt = sniff_format(data)
    # Structure first, before Pillow parses a byte: it walks every segment and chunk in Python.
    scans = 1
    if fmt == JPEG:
        scans, segments = jpeg_structure(data)
        if scans > MAX_JPEG_SCANS or segments > MAX_JPEG_SEGMENTS:
            raise ImageTooComplex()
    elif fmt == PNG and png_chunks(data) > MAX_PNG_CHUNKS:
        raise ImageTooComplex()
    cost = 0
    try:
        opened = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = opened.size
        if width <= 0 or height <= 0:
            raise CorruptImage()
        if width * height > max_pixels or max(width, height) > MAX_SIDE:
            raise TooManyPixels()
        cost = decode_cost(opened, fmt, min_side, scans)
        if cost > max_decode_bytes:
            raise ImageTooComplex()
        large = budget is not None and cost >= LARGE_DECODE_BYTES
        with budget.reserve(cost) if large and budget is not None else nullcontext():
            if fmt == JPEG and min_side is not None:
                opened.draft("RGB", (min_side, min_side))
            opened.seek(0)
            opened.load()
            orientation = opened.getexif().get(_ORIENTATION, 1)
            return to_rgb(_orient(_shrink(opened, min_side), orientation))
    except (TooManyPixels, CorruptImage, ImageTooComplex, Overloaded):
        raise
    except MemoryError as exc:
        raise ImageTooComplex() from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise TooManyPixels() from exc
    except Exception as exc:
        # Pillow signals malformed data with many exception types (OSError, SyntaxError, struct.error,
        # ValueError, ...); none of their text reaches the client.
        raise CorruptImage() from exc
    finally:
        if cost >= LARGE_DECODE_BYTES:
            release_memory()  # also after a large decode that failed half-way


_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "I", "F", "CMYK", "PA"})


def _shrink(image: Image.Image, min_side: int | None) -> Image.Image:
    """An image over twice the size preprocessing needs, reduced by an integer box filter before any conversion,
    so that conversions copy the small image (a 5000x5000 16-bit PNG: the RSS rise fell from 257 to 117 MB,
    scripts/bench_hostile.py). JPEG needs none: draft mode already decoded it small."""
    if min_side is None:
        return image
    factor = min(image.size) // (2 * min_side)
    if factor < 2:
        return image
    if image.mode in _REDUCIBLE:
        return image.reduce(factor)
    if image.mode.startswith("I;16"):
        arr = np.asarray(image)
        h, w = (arr.shape[0] // factor) * factor, (arr.shape[1] // factor) * factor
        boxes = arr[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
        return Image.fromarray(boxes.astype(np.uint16))  # mode I;16
    return image  # palette and 1-bit: one byte a pixel at most, converted whole


def _orient(image: Image.Image, orientation: object) -> Image.Image:
    """EXIF orientation, applied after shrinking (as ImageOps.exif_transpose would before it)."""
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return image.transpose(method) if method is not None else image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white, 16/32-bit is rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit grey to 8: the high byte, or the value itself when nothing exceeds 255. Integer arithmetic: the
        # first version went through float64, 8 bytes a pixel (a 40 MP image: +0.9 GB RSS).
        arr16 = np.asarray(image)
        gray = (arr16 >> 8).astype(np.uint8) if arr16.size and int(arr16.max()) > 255 else arr16.astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255.0 else 1.0
        gray = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if (mode == "P" and "transparency" in image.info) or mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


# --- memory given back ------------------------------------------------------------------------------------------
# glibc keeps freed arena memory mapped: a hostile batch left RSS at 5.3x its baseline (scripts/bench_hostile.py).
# malloc_trim returns it to the system (0.04 ms median, 0.3 ms at most over 20 calls here); called after large
# decodes only.
_LIBC_NAME = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_LIBC_NAME) if _LIBC_NAME else None


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc malloc_trim; a no-op elsewhere)."""
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


# glibc's M_ARENA_MAX. With its default (8 per core) a hostile batch left RSS at 1.09-1.20x its baseline after
# trimming; with 2 arenas 0.87-0.90x (two runs each, scripts/bench_hostile.py). Set per process at start.
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process (what MALLOC_ARENA_MAX does from the environment)."""
    mallopt = getattr(_LIBC, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, arenas) == 1)


# --- library warnings -------------------------------------------------------------------------------------------
# Pillow warns once per bad EXIF tag: 5,400 bogus tags wrote 1.1 MB of raw UserWarning lines to the log. Warnings
# raised while a request decodes are collected here (per request: a context variable, safe across the pool's
# threads) and reported by the service as one counted JSON line; `warnings.catch_warnings` is not thread-safe.
MAX_COLLECTED = 3  # messages kept per request; the rest are only counted


class Collected:
    def __init__(self) -> None:
        self.count = 0
        self.messages: list[str] = []


_COLLECTOR: ContextVar[Collected | None] = ContextVar("vps_warning_collector", default=None)
_previous_showwarning = warnings.showwarning


def _showwarning(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
    collected = _COLLECTOR.get()
    if collected is None:
        _previous_showwarning(message, category, filename, lineno, file, line)
        return
    collected.count += 1
    if len(collected.messages) < MAX_COLLECTED:
        collected.messages.append(f"{category.__name__}: {str(message)[:200]}")


def install_warning_capture() -> None:
    """Route warnings raised inside `collect_warnings()` to its collector (once per process; idempotent).
    `always`: without it Python shows each distinct message once per location and the count would lie."""
    global _previous_showwarning
    if warnings.showwarning is not _showwarning:
        _previous_showwarning = warnings.showwarning  # logging's hook, once captureWarnings is on: never ours
        warnings.showwarning = _showwarning
    warnings.filterwarnings("always", module=r"PIL\..*")
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@contextmanager
def collect_warnings(into: Collected | None = None) -> Iterator[Collected]:
    collected = into if into is not None else Collected()
    token = _COLLECTOR.set(collected)
    try:
        yield collected
    finally:
        _COLLECTOR.reset(token)
