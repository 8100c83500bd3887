"""The one place that touches untrusted image bytes.

Format is sniffed from the bytes and only the matching Pillow plugin is allowed to parse them, so a file that
claims to be a JPEG never reaches the TIFF, PSD or PDF plugins. The pixel count is checked from the header before
any pixel is decoded; only the first frame of an animation is ever decoded. Accepted: JPEG, PNG, WebP, HEIC/HEIF
(pillow-heif, registered here on first use), AVIF (Pillow's own plugin) and GIF.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import math
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image

from app.errors import (
    CorruptImage,
    EmptyBody,
    ImageTooComplex,
    InvalidRegion,
    Overloaded,
    TooManyPixels,
    UnsupportedFormat,
)

JPEG: Final = "JPEG"
PNG: Final = "PNG"
WEBP: Final = "WEBP"
HEIF: Final = "HEIF"  # HEIC is HEIF with HEVC inside; pillow-heif's format name covers both
AVIF: Final = "AVIF"
GIF: Final = "GIF"


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
    if len(data) >= 12 and data[4:8] == b"ftyp":
        fmt = _ftyp_format(data)
        if fmt is not None:
            return fmt
    if data.startswith((b"GIF87a", b"GIF89a")):
        return GIF
    raise UnsupportedFormat()


_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"heim", b"heis"})
_GENERIC_BRANDS = frozenset({b"mif1", b"msf1"})  # HEIF's structural brands: the codec is in the compatible ones


def _ftyp_format(data: bytes) -> str | None:
    """HEIF or AVIF from the ftyp box's major brand; for a structural major brand (mif1, msf1), from the compatible
    brands, AVIF's first. A generic HEIF names no codec brand: libheif is given it and refuses what it cannot
    decode."""
    major = data[8:12]
    if major in _AVIF_BRANDS:
        return AVIF
    if major in _HEIF_BRANDS:
        return HEIF
    if major not in _GENERIC_BRANDS:
        return None
    end = min(int.from_bytes(data[:4], "big"), len(data), 16 + 4 * 64)
    compatible = {data[i : i + 4] for i in range(16, end - 3, 4)}
    return AVIF if compatible & _AVIF_BRANDS else HEIF


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
# 9.8 MP palette PNG (converted whole); a 14 MP HEIC or RGB AVIF, a 10.4 MP AVIF with alpha, an 8.8 MP GIF. A
# 24 MP HEIC (7.3 B/px measured, 175 MB) needs VPS_MAX_DECODE_BYTES of 288 MB by the rule.
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


# GIF: Pillow reads the blocks before the first frame in Python, one sub-block (or stray byte) a step; a canvas
# larger than the logical screen (a first frame reaching past it) is allocated, with its disposal buffer, as the
# file is opened. Both are read here first. Pillow's own GIFs take 1 to 3 steps; the limit leaves room for comments
# and XMP packets (whose text a reader walks as sub-blocks).
MAX_GIF_BLOCKS = 4096


def _gif_sub_block(data: bytes, i: int) -> tuple[int, int]:
    """(size, next position) of the sub-block at i, as Pillow's GifImageFile.data reads it (0 at the end)."""
    if i >= len(data):
        return 0, i
    size = data[i]
    return size, i + 1 + size


def gif_structure(data: bytes) -> tuple[int, int, int]:
    """(width, height, steps) of a GIF without decoding: the canvas Pillow allocates for the first frame (the
    logical screen, grown to that frame's extent) and the steps its Python loop takes before the frame's data,
    following GifImagePlugin._seek's reading exactly; stops past the limit."""
    n = len(data)
    if n < 13:
        return 0, 0, 0
    width, height, flags = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little"), data[10]
    i = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    steps = 0
    while i < n and steps <= MAX_GIF_BLOCKS:
        steps += 1
        kind, i = data[i], i + 1
        if kind == 0x3B:  # trailer: no frame (Pillow refuses it)
            break
        if kind == 0x2C:  # the first image descriptor: left, top, width, height
            if i + 8 <= n:
                x0, y0, w, h = (int.from_bytes(data[i + k : i + k + 2], "little") for k in (0, 2, 4, 6))
                width, height = max(width, x0 + w), max(height, y0 + h)
            break
        if kind != 0x21:  # a byte that starts no block: Pillow skips it
            continue
        label = data[i] if i < n else 0
        size, i = _gif_sub_block(data, i + 1)
        if label == 0xFE:  # comment: sub-blocks up to an empty one
            while size and steps <= MAX_GIF_BLOCKS:
                steps += 1
                size, i = _gif_sub_block(data, i)
            continue
        if label == 0xFF and size and data[i - size : i].startswith(b"NETSCAPE2.0"):
            size, i = _gif_sub_block(data, i)
        while steps <= MAX_GIF_BLOCKS:  # then sub-blocks up to an empty one, even after an empty first one
            steps += 1
            size, i = _gif_sub_block(data, i)
            if not size:
                break
    return width, height, steps


# HEIF and AVIF: ISO BMFF boxes, walked before libheif or libavif is given the bytes, for the largest frame the
# codec will be made to allocate. The image's header size (`ispe`) is not it: libheif decodes a grid at its
# descriptor's size before comparing with `ispe` (a 16 MP grid inside a 64x64 `ispe` took 28 MB before being
# refused), and libavif decodes an AV1 frame of any size inside a small `ispe` (1,096 bytes declaring 64x64 took
# 139 MB for an 8000x8000 frame). So the bound is the largest of: every `ispe`, every grid and overlay
# descriptor, and (AVIF) every AV1 sequence header's maximum frame size in the payloads libavif may decode.
MAX_BMFF_BOXES = 4096  # boxes, items and extents (libheif refuses more than 1,000 items)
MAX_AV1_OBUS = 4096  # OBUs walked in one AV1 payload
# HEIF primaries libheif is given: HEVC and grids (of HEVC tiles), what cameras and phones write.
_HEIF_PRIMARY_TYPES = frozenset({b"hvc1", b"grid"})
_REFUSED_ITEM_TYPES = frozenset({b"tili"})  # libheif's tiled images carry their own size, not walked here


class _Container:
    """The items of a HEIF/AVIF file's top-level `meta` box and the first samples of its tracks, read with every
    walk bounded (ImageTooComplex past MAX_BMFF_BOXES); malformed structure ends a walk early and is left to the
    decoder to refuse."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._left = MAX_BMFF_BOXES
        self._bytes_left = len(data)  # payload bytes copied, all items together: an extent is read once
        self.primary: int | None = None
        self.types: dict[int, bytes] = {}
        self.extents: dict[int, list[tuple[int, int, int]]] = {}  # item -> (construction method, offset, length)
        self.idat: tuple[int, int] | None = None
        self.properties: list[tuple[bytes, int, int]] = []  # ipco children
        self.samples: list[bytes] = []  # the first sample of each av01 track
        self.sample_configs: list[bytes] = []  # their av1C boxes' payloads
        for kind, start, end in self.boxes(0, len(data)):
            if kind == b"meta" and not self.types:
                self._meta(start + 4, end)
            elif kind == b"moov":
                self._tracks(start, end)

    def tick(self, n: int = 1) -> None:
        self._left -= n
        if self._left < 0:
            raise ImageTooComplex()

    def boxes(self, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
        """(type, payload start, payload end) of the boxes in data[start:end]."""
        data = self.data
        end, i = min(end, len(data)), start
        while i + 8 <= end:
            self.tick()
            size, kind, head = _uint(data, i, 4), data[i + 4 : i + 8], 8
            if size == 1:
                size, head = _uint(data, i + 8, 8), 16
            elif size == 0:
                size = end - i
            if size < head or i + size > end:
                return
            yield kind, i + head, i + size
            i += size

    def child(self, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
        for k, a, b in self.boxes(start, end):
            if k == kind:
                return a, b
        return None

    def _meta(self, start: int, end: int) -> None:
        data = self.data
        for kind, a, b in self.boxes(start, end):
            if kind == b"pitm" and b - a >= 6:
                self.primary = _uint(data, a + 4, 2 if data[a] == 0 else 4)
            elif kind == b"iinf" and b - a >= 6:
                for k, x, y in self.boxes(a + (6 if data[a] == 0 else 8), b):
                    if k == b"infe" and y - x >= 12 and data[x] >= 2:
                        width = 2 if data[x] == 2 else 4
                        item = _uint(data, x + 4, width)
                        self.types[item] = data[x + 4 + width + 2 : x + 4 + width + 6]
            elif kind == b"iloc":
                self._iloc(a, b)
            elif kind == b"idat":
                self.idat = (a, b)
            elif kind == b"iprp":
                ipco = self.child(a, b, b"ipco")
                if ipco is not None:
                    self.properties = list(self.boxes(*ipco))

    def _iloc(self, a: int, b: int) -> None:
        data = self.data
        if b - a < 8:
            return
        version, p = data[a], a + 4
        offset_size, length_size = data[p] >> 4, data[p] & 15
        base_size, index_size = data[p + 1] >> 4, (data[p + 1] & 15) if version in (1, 2) else 0
        id_size = 2 if version < 2 else 4
        count, p = _uint(data, p + 2, id_size), p + 2 + id_size
        for _ in range(count):
            self.tick()
            item, p = _uint(data, p, id_size), p + id_size
            method = 0
            if version in (1, 2):
                method, p = _uint(data, p, 2) & 15, p + 2
            p += 2  # data reference index
            base, p = _uint(data, p, base_size), p + base_size
            n_extents, p = _uint(data, p, 2), p + 2
            self.tick(n_extents)
            for _ in range(n_extents):
                p += index_size
                offset, p = _uint(data, p, offset_size), p + offset_size
                length, p = _uint(data, p, length_size), p + length_size
                self.extents.setdefault(item, []).append((method, base + offset, length))
            if p > b:
                return

    def _tracks(self, start: int, end: int) -> None:
        data = self.data
        for kind, a, b in self.boxes(start, end):
            if kind != b"trak":
                continue
            stbl = self._path(a, b, (b"mdia", b"minf", b"stbl"))
            if stbl is None:
                continue
            stsd, stsz = self.child(*stbl, b"stsd"), self.child(*stbl, b"stsz")
            stco, co64 = self.child(*stbl, b"stco"), self.child(*stbl, b"co64")
            if stsd is None or stsz is None:
                continue
            av01 = [(x, y) for k, x, y in self.boxes(stsd[0] + 8, stsd[1]) if k == b"av01"]
            if not av01:
                continue
            for x, y in av01:  # VisualSampleEntry: 78 bytes of fields, then its boxes
                config = self.child(x + 78, y, b"av1C")
                if config is not None:
                    self.sample_configs.append(data[config[0] + 4 : config[1]])
            size = _uint(data, stsz[0] + 4, 4) or _uint(data, stsz[0] + 12, 4)  # one size for all, or the first's
            if stco is not None:
                offset = _uint(data, stco[0] + 8, 4)
            elif co64 is not None:
                offset = _uint(data, co64[0] + 8, 8)
            else:
                continue
            self.samples.append(self._copy(offset, offset + size))

    def _path(self, start: int, end: int, kinds: tuple[bytes, ...]) -> tuple[int, int] | None:
        span: tuple[int, int] | None = (start, end)
        for kind in kinds:
            if span is None:
                return None
            span = self.child(*span, kind)
        return span

    def _copy(self, start: int, end: int) -> bytes:
        start, end = max(0, start), min(end, len(self.data))
        self._bytes_left -= max(0, end - start)
        if self._bytes_left < 0:
            raise ImageTooComplex()
        return self.data[start:end]

    def item_data(self, item: int, limit: int | None = None) -> bytes:
        """An item's bytes, its extents joined (construction method 0: the file; 1: the idat box); the first
        `limit` bytes only when given."""
        parts: list[bytes] = []
        for method, offset, length in self.extents.get(item, []):
            if method == 0:
                base, end = 0, len(self.data)
            elif method == 1 and self.idat is not None:
                base, end = self.idat
            else:
                continue
            start = base + offset
            stop = start + length if length else end
            if limit is not None:
                stop = min(stop, start + limit - sum(map(len, parts)))
            parts.append(self._copy(start, stop))
        return b"".join(parts)


def _uint(data: bytes, i: int, size: int) -> int:
    return int.from_bytes(data[i : i + size], "big")


def _descriptor_size(kind: bytes, payload: bytes) -> tuple[int, int]:
    """The output size a grid or overlay item's data declares (ISO/IEC 23008-12 6.6.2.3, 6.6.2.4)."""
    if len(payload) < 2:
        return 0, 0
    width = 4 if payload[1] & 1 else 2
    offset = 4 if kind == b"grid" else 10  # grid: version, flags, rows, columns; iovl: version, flags, 4 fill values
    return _uint(payload, offset, width), _uint(payload, offset + width, width)


def container_frames(data: bytes, fmt: str) -> tuple[int, int]:
    """(pixels, side) of the largest frame the HEIF or AVIF decoder may allocate for this file, read from its
    boxes without decoding (see above). AVIF without any AV1 sequence header is CorruptImage (its frames could
    not be decoded); a HEIF whose primary image is neither HEVC nor a grid is UnsupportedFormat."""
    box = _Container(data)
    sizes: list[tuple[int, int]] = []
    for kind, a, b in box.properties:
        if kind == b"ispe" and b - a >= 12:
            sizes.append((_uint(data, a + 4, 4), _uint(data, a + 8, 4)))
        elif kind == b"av1C" and fmt == AVIF:
            sizes.extend(_av1_frame_sizes(data[a + 4 : b]))
    if any(t in _REFUSED_ITEM_TYPES for t in box.types.values()):
        raise UnsupportedFormat()
    if fmt == HEIF and box.primary is not None and box.types.get(box.primary, b"hvc1") not in _HEIF_PRIMARY_TYPES:
        raise UnsupportedFormat()
    found = False
    for item, kind in box.types.items():
        if kind in (b"grid", b"iovl"):
            sizes.append(_descriptor_size(kind, box.item_data(item, limit=32)))
        elif kind == b"av01" and fmt == AVIF:
            frames = _av1_frame_sizes(box.item_data(item))
            found = found or bool(frames)
            sizes.extend(frames)
    if fmt == AVIF:
        for payload in box.samples + box.sample_configs:
            frames = _av1_frame_sizes(payload)
            found = found or bool(frames)
            sizes.extend(frames)
        if not found:
            raise CorruptImage()
    if not sizes:
        return 0, 0
    return max(w * h for w, h in sizes), max(max(w, h) for w, h in sizes)


def _leb128(data: bytes, i: int) -> tuple[int, int]:
    value = 0
    for k in range(8):
        if i + k >= len(data):
            return -1, i + k
        byte = data[i + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, i + k + 1
    return -1, i + 8


def _av1_frame_sizes(payload: bytes) -> list[tuple[int, int]]:
    """The maximum frame size of every sequence header OBU in an AV1 payload (AV1 5.3, 5.5)."""
    sizes: list[tuple[int, int]] = []
    i, n = 0, len(payload)
    for _ in range(MAX_AV1_OBUS):
        if i >= n:
            return sizes
        header = payload[i]
        kind, extension, has_size = (header >> 3) & 15, (header >> 2) & 1, (header >> 1) & 1
        j = i + 1 + extension
        if has_size:
            size, j = _leb128(payload, j)
            if size < 0:
                return sizes
        else:
            size = n - j
        if kind == 1:  # OBU_SEQUENCE_HEADER
            frame = _av1_sequence_size(payload[j : j + size])
            if frame is not None:
                sizes.append(frame)
        i = j + size
    if i < n:
        raise ImageTooComplex()
    return sizes


class _Bits:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.pos >> 3
            if byte >= len(self.data):
                raise EOFError
            value = (value << 1) | ((self.data[byte] >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def uvlc(self) -> int:
        zeros = 0
        while not self.read(1):
            zeros += 1
        return (1 << 32) - 1 if zeros >= 32 else self.read(zeros) + (1 << zeros) - 1


def _av1_sequence_size(body: bytes) -> tuple[int, int] | None:
    """(max_frame_width, max_frame_height) of a sequence header OBU's payload, or None when truncated."""
    bits = _Bits(body)
    try:
        bits.read(3)  # seq_profile
        bits.read(1)  # still_picture
        if bits.read(1):  # reduced_still_picture_header
            bits.read(5)
        else:
            decoder_model, buffer_delay_length = False, 0
            if bits.read(1):  # timing_info_present_flag
                bits.read(32)
                bits.read(32)
                if bits.read(1):  # equal_picture_interval
                    bits.uvlc()
                decoder_model = bool(bits.read(1))
                if decoder_model:
                    buffer_delay_length = bits.read(5) + 1
                    bits.read(32)
                    bits.read(10)  # buffer_removal_time_length_minus_1, frame_presentation_time_length_minus_1
            initial_display_delay = bits.read(1)
            for _ in range(bits.read(5) + 1):  # operating points
                bits.read(12)
                if bits.read(5) > 7:
                    bits.read(1)
                if decoder_model and bits.read(1):
                    bits.read(2 * buffer_delay_length + 1)
                if initial_display_delay and bits.read(1):
                    bits.read(4)
        width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
        return bits.read(width_bits) + 1, bits.read(height_bits) + 1
    except EOFError:
        return None


def jpeg_scale(size: tuple[int, int], min_side: int | None) -> int:
    """The DCT scale draft mode decodes at (1, 2, 4 or 8) with both sides of `size` kept >= min_side."""
    scale = 1
    if min_side is not None:
        while scale < 8 and min(size) // (scale * 2) >= min_side:
            scale *= 2
    return scale


# Per-format storage a pixel, Pillow's copy included. Measured (peak RSS rise of decode_image, 4000x3000 8-bit
# files, libheif and libavif on one thread, min_side 288 / none): HEIF RGB 6.9-7.6 B/px (single and grid), RGBA
# 8.4 / 16.2; AVIF RGB 9.0 (4:2:0) and 10.3 (4:4:4), with alpha 11.6 and 13.1 / 21.0; GIF, palette converted whole,
# 4.9 plain, 18.0 with transparency and a disposal buffer. The rules below are above each. 10- and 12-bit AVIF were
# not measured (Pillow writes 8-bit only).
_CODEC_BYTES = {WEBP: 8, HEIF: 8, GIF: 3}  # the decoder's canvas and Pillow's copy of it (GIF: + disposal)


def _stored_bytes(opened: Image.Image, fmt: str) -> int:
    if fmt == AVIF:
        return 12 if "A" in opened.mode else 8
    stored = _CODEC_BYTES.get(fmt, _BYTES_PER_PIXEL.get(opened.mode, 4))
    if fmt in (PNG, WEBP) and getattr(opened, "n_frames", 1) > 1:  # GIF's n_frames would walk every frame
        stored += 4  # an animation decoder keeps the previous canvas too
    return stored


def _converted_whole(image: Image.Image) -> bool:
    """Palette, 1-bit and grey with a transparent value: converted at full size (averaging would lose which
    pixels are transparent)."""
    return image.mode in ("P", "1") or (image.mode == "L" and "transparency" in image.info)


def decode_cost(
    opened: Image.Image,
    fmt: str,
    min_side: int | None,
    scans: int = 1,
    *,
    crop: tuple[int, int] | None = None,
    codec_pixels: int = 0,
    scale: int | None = None,
) -> int:
    """Bytes the decode of `opened` will hold at its peak, from the header alone; on the safe side of what
    scripts/bench_hostile.py measured for each kind. `crop`: the size, at full resolution, of the region kept
    (None: the whole image); `codec_pixels`: the largest frame the codec allocates when the container's header
    understates it (HEIF and AVIF, `container_frames`); `scale`: JPEG's draft scale when the caller chose it."""
    w, h = opened.size
    pixels = max(w * h, codec_pixels)
    kept = crop if crop is not None else (w, h)
    if fmt == JPEG:
        # Draft mode decodes at 1/2, 1/4 or 1/8 while the kept part stays >= min_side. The decoded image (4 bytes
        # a pixel in Pillow) and its RGB copy; with a region, the crop's copy and its RGB copy besides the whole
        # decoded image.
        scale = scale or jpeg_scale(kept, min_side)
        decoded = pixels // (scale * scale)
        out = decoded * 4 * 2 if crop is None else decoded * 4 + (kept[0] * kept[1] // (scale * scale)) * 4 * 2
        if scans > 1 or opened.info.get("progressive") or opened.info.get("progression"):
            # More than one scan (progressive, or baseline with a scan per component): libjpeg keeps every
            # component's coefficients at full size, 2 bytes a sample (a 367-byte CMYK file: +308 MB).
            layers = getattr(opened, "layer", None) or [(0, 1, 1, 0)] * 4
            hmax = max(layer[1] for layer in layers)
            vmax = max(layer[2] for layer in layers)
            out += sum(2 * pixels * layer[1] * layer[2] // (hmax * vmax) for layer in layers)
        return out
    stored = _stored_bytes(opened, fmt)
    shrinks = min_side is not None and min(kept) // (2 * min_side) >= 2 and not _converted_whole(opened)
    # Reduced first: one full-size temporary at most (RGBa premultiplied). Converted whole: palette with
    # transparency goes through RGBA three times (+648 MB measured for a 6324^2 palette PNG).
    convert = 4 if shrinks else 16
    if crop is None:
        return pixels * (stored + convert)
    # The whole image stays decoded while its crop (in Pillow's storage) is copied, reduced and converted.
    return pixels * stored + kept[0] * kept[1] * (_BYTES_PER_PIXEL.get(opened.mode, 4) + convert)


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


@dataclass(frozen=True)
class Region:
    """A region of interest of the photo: x1,y1 inclusive, x2,y2 exclusive, in the EXIF-oriented photo (what its
    user sees). `fractional`: fractions 0..1 of its width and height; otherwise pixels of the photo as sent
    (full size, whatever scale it is decoded at). Checked as made (InvalidRegion): finite, ordered, not negative,
    fractions within 0..1; against the photo's size by `pixels`."""

    x1: float
    y1: float
    x2: float
    y2: float
    fractional: bool = False

    def __post_init__(self) -> None:
        values = (self.x1, self.y1, self.x2, self.y2)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise InvalidRegion("bbox values must be finite numbers")
        if min(values) < 0:
            raise InvalidRegion("bbox coordinates must not be negative")
        if self.fractional and max(values) > 1:
            raise InvalidRegion("with bbox_units=fraction, bbox coordinates must be within 0..1")
        if self.x1 >= self.x2:
            raise InvalidRegion("bbox x1 must be less than x2")
        if self.y1 >= self.y2:
            raise InvalidRegion("bbox y1 must be less than y2")

    @classmethod
    def parse(cls, text: str, units: str = "px") -> Region:
        """ "x1,y1,x2,y2" in `units` ("px" or "fraction")."""
        if units not in ("px", "fraction"):
            raise InvalidRegion("bbox_units must be 'px' or 'fraction'")
        if len(text) > 256:
            raise InvalidRegion("bbox is too long: four numbers x1,y1,x2,y2")
        parts = text.split(",")
        if len(parts) != 4:
            raise InvalidRegion(f"bbox must be four comma-separated numbers x1,y1,x2,y2, not {len(parts)}")
        values = []
        for name, part in zip(("x1", "y1", "x2", "y2"), parts, strict=True):
            try:
                values.append(float(part))
            except ValueError:
                raise InvalidRegion(f"bbox {name} is not a number") from None
        x1, y1, x2, y2 = values
        return cls(x1, y1, x2, y2, fractional=units == "fraction")

    def pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The box in pixels of a photo of this size (oriented, full size); InvalidRegion when it reaches outside
        the photo or is smaller than one of its pixels."""
        if self.fractional:
            box = (self.x1 * width, self.y1 * height, self.x2 * width, self.y2 * height)
        else:
            for name, value, limit, side in (("x2", self.x2, width, "width"), ("y2", self.y2, height, "height")):
                if value > limit:
                    raise InvalidRegion(
                        f"bbox {name}={value:g} is outside the photo, whose {side} is {limit} px (after EXIF "
                        "orientation)"
                    )
            box = (self.x1, self.y1, self.x2, self.y2)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            raise InvalidRegion(
                f"bbox is smaller than one pixel of the photo ({box[2] - box[0]:.3g} x {box[3] - box[1]:.3g} px)"
            )
        return box


def stored_box(region: Region, size: tuple[int, int], orientation: int) -> tuple[int, int, int, int] | None:
    """`region` (in the oriented photo) as a pixel box of the image as stored, of `size`, before `orientation`
    (1-8) is applied; None when it covers the whole image. Edges are rounded to the nearest pixel boundary."""
    w, h = size
    x1, y1, x2, y2 = region.pixels(*((h, w) if orientation in (5, 6, 7, 8) else (w, h)))
    a1, b1, a2, b2 = (math.floor(v + 0.5) for v in (x1, y1, x2, y2))
    box = {
        1: (a1, b1, a2, b2),
        2: (w - a2, b1, w - a1, b2),
        3: (w - a2, h - b2, w - a1, h - b1),
        4: (a1, h - b2, a2, h - b1),
        5: (b1, a1, b2, a2),
        6: (b1, h - a2, b2, h - a1),
        7: (w - b2, h - a2, w - b1, h - a1),
        8: (w - b2, a1, w - b1, a2),
    }[orientation]
    return None if box == (0, 0, w, h) else box


def _scaled_box(
    box: tuple[int, int, int, int], full: tuple[int, int], decoded: tuple[int, int]
) -> tuple[int, int, int, int]:
    """A full-size box on an image decoded smaller (JPEG draft mode), rounded outwards: never below the size the
    scale was chosen for."""
    if full == decoded:
        return box
    sx, sy = decoded[0] / full[0], decoded[1] / full[1]
    x1, y1 = min(math.floor(box[0] * sx), decoded[0] - 1), min(math.floor(box[1] * sy), decoded[1] - 1)
    return (
        x1,
        y1,
        max(x1 + 1, min(math.ceil(box[2] * sx), decoded[0])),
        max(y1 + 1, min(math.ceil(box[3] * sy), decoded[1])),
    )


_PLUGINS_LOCK = threading.Lock()
_plugins_ready = False


def _prepare_plugins() -> None:
    """pillow-heif registered as Pillow's HEIF plugin, once, on the first HEIF or AVIF (the service never imports
    it otherwise). libheif and libavif decode on one thread: their memory was measured so (Pillow's AVIF default is
    a thread per core the process may use, so its memory would follow the node), and each decode takes one core
    of the pool's. Measured on this two-core machine, median of 7: a 12 MP grid HEIC in 243 ms on one thread,
    235 on four; a 12 MP AVIF in 87 ms on one, 68 on two."""
    global _plugins_ready
    with _PLUGINS_LOCK:
        if _plugins_ready:
            return
        import pillow_heif
        from PIL import AvifImagePlugin

        AvifImagePlugin.DEFAULT_MAX_THREADS = 1
        # No thumbnails, depth or auxiliary images: only the primary image is wanted, and less is parsed.
        pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False, decode_threads=1)
        _plugins_ready = True


def _header_orientation(opened: Image.Image, fmt: str) -> int | None:
    """EXIF orientation (1-8) known before decoding; None for a PNG whose eXIf chunk, if any, follows its pixels
    (PngImageFile.getexif decodes the image to look for it). HEIF: always 1: libheif applies the file's rotation
    and mirroring (irot, imir) itself, and the EXIF orientation only restates them (pillow-heif resets it to 1;
    reading it, or an XMP one, again would rotate twice)."""
    if fmt == HEIF:
        return 1
    if fmt == PNG and "exif" not in opened.info:
        return None
    return _orientation_of(opened)


def _orientation_of(opened: Image.Image) -> int:
    value = opened.getexif().get(_ORIENTATION, 1)
    return value if isinstance(value, int) and value in _TRANSPOSE else 1


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels or max(width, height) > MAX_SIDE:
        raise TooManyPixels()


def decode_image(
    data: bytes,
    *,
    max_pixels: int,
    min_side: int | None = None,
    max_decode_bytes: int = MAX_DECODE_BYTES,
    budget: DecodeBudget | None = None,
    region: Region | None = None,
) -> Image.Image:
    """Decode untrusted bytes to an RGB image (first frame, EXIF orientation applied), cropped to `region` when
    given.

    Refused before any pixel is decoded: too many pixels or too long a side (TooManyPixels), too many JPEG scans
    or segments, PNG chunks or GIF blocks, or an estimated decode memory above `max_decode_bytes`
    (ImageTooComplex), a region outside the photo (InvalidRegion); `budget`, when given, bounds the decode memory
    of all requests together. `min_side` lets JPEG decode at a reduced scale (DCT draft mode) while keeping both
    sides (of the region, when given) >= min_side: a 12 MP photo bound for a 224-pixel model decodes about 2-3x
    faster that way. The region is mapped onto the image as stored and cropped before orientation, shrinking and
    conversion: the same pixels as orienting first, copying the crop only. Warnings: `collect_warnings`."""
    fmt = sniff_format(data)
    cost = 0
    try:
        scans, codec_pixels = _check_structure(data, fmt, max_pixels)
        opened = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = opened.size
        if width <= 0 or height <= 0:
            raise CorruptImage()
        _check_size(width, height, max_pixels)
        orientation = _header_orientation(opened, fmt)
        # A PNG's eXIf after its pixels is only known after loading: its box is checked then (and the cost
        # estimated for the whole photo, an upper bound).
        box = stored_box(region, (width, height), orientation) if region is not None and orientation else None
        scale, cost = _plan(opened, fmt, box, min_side, scans, codec_pixels, max_decode_bytes)
        if cost > max_decode_bytes:
            raise ImageTooComplex()
        large = budget is not None and cost >= LARGE_DECODE_BYTES
        with budget.reserve(cost) if large and budget is not None else nullcontext():
            _load(opened, fmt, scale, min_side)
            if orientation is None:
                orientation = _orientation_of(opened)
                if region is not None:
                    box = stored_box(region, (width, height), orientation)
            image: Image.Image = opened
            if box is not None:
                image = opened.crop(_scaled_box(box, (width, height), opened.size))
            return to_rgb(_orient(_shrink(image, min_side), orientation))
    except (TooManyPixels, CorruptImage, ImageTooComplex, Overloaded, InvalidRegion, UnsupportedFormat):
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


def _check_structure(data: bytes, fmt: str, max_pixels: int) -> tuple[int, int]:
    """Structure first, before Pillow (or libheif, libavif) parses a byte: see each walker. Returns the JPEG's
    scans and the largest frame a HEIF/AVIF container declares (pixels)."""
    scans, codec_pixels = 1, 0
    if fmt == JPEG:
        scans, segments = jpeg_structure(data)
        if scans > MAX_JPEG_SCANS or segments > MAX_JPEG_SEGMENTS:
            raise ImageTooComplex()
    elif fmt == PNG and png_chunks(data) > MAX_PNG_CHUNKS:
        raise ImageTooComplex()
    elif fmt == GIF:
        canvas_w, canvas_h, blocks = gif_structure(data)
        if blocks > MAX_GIF_BLOCKS:
            raise ImageTooComplex()
        _check_size(canvas_w, canvas_h, max_pixels)
    elif fmt in (HEIF, AVIF):
        codec_pixels, codec_side = container_frames(data, fmt)
        if codec_pixels > max_pixels or codec_side > MAX_SIDE:
            raise TooManyPixels()
        _prepare_plugins()
    return scans, codec_pixels


def _plan(
    opened: Image.Image,
    fmt: str,
    box: tuple[int, int, int, int] | None,
    min_side: int | None,
    scans: int,
    codec_pixels: int,
    max_decode_bytes: int,
) -> tuple[int | None, int]:
    """The JPEG draft scale for a crop (None: no crop-driven scale) and the decode's estimated cost. The crop's
    sides decide the scale; a coarser one (up to the whole photo's) only when the finer would cost too much."""
    crop = (box[2] - box[0], box[3] - box[1]) if box is not None else None
    if fmt == JPEG and crop is not None and min_side is not None:
        scale, whole = jpeg_scale(crop, min_side), jpeg_scale(opened.size, min_side)
        while scale < whole and decode_cost(opened, fmt, min_side, scans, crop=crop, scale=scale) > max_decode_bytes:
            scale *= 2
        return scale, decode_cost(opened, fmt, min_side, scans, crop=crop, scale=scale)
    return None, decode_cost(opened, fmt, min_side, scans, crop=crop, codec_pixels=codec_pixels)


def _load(opened: Image.Image, fmt: str, scale: int | None, min_side: int | None) -> None:
    width, height = opened.size
    if scale is not None:
        if scale > 1:
            opened.draft("RGB", (width // scale, height // scale))  # Pillow then picks exactly `scale`
    elif fmt == JPEG and min_side is not None:
        opened.draft("RGB", (min_side, min_side))
    if fmt != HEIF:
        opened.seek(0)  # pillow-heif opens at the primary image, which need not be the first
    opened.load()


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
    if min_side is None or _converted_whole(image):
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
    if (mode in ("P", "L") and "transparency" in image.info) or mode in ("LA", "La", "PA", "RGBa"):
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
