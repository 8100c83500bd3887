"""Decode cost bounded by what a request may spend, before any pixel is decoded: JPEG scans and segments
counted, decode memory estimated from the header, a shared budget for all requests, memory-frugal conversions,
and library warnings collected instead of printed (issue 16, classes 1-3)."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from app.engine.imaging import (
    MAX_DECODE_BYTES,
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    DecodeBudget,
    collect_warnings,
    decode_cost,
    decode_image,
    install_warning_capture,
    jpeg_structure,
    png_chunks,
    to_rgb,
)
from app.errors import ImageTooComplex, Overloaded, TooManyPixels
from tests.hostile import animated_webp, exif_warning_jpeg, progressive_jpeg, scan_bomb, segment_bomb, sixteen_bit_png

CAP = 40_000_000


def test_scans_and_segments_are_counted_without_decoding() -> None:
    assert jpeg_structure(progressive_jpeg(64, 64)) == (10, 24)  # libjpeg's progressive script: 10 scans
    baseline = io.BytesIO()
    Image.new("RGB", (64, 64)).save(baseline, "JPEG")
    assert jpeg_structure(baseline.getvalue())[0] == 1
    assert jpeg_structure(scan_bomb(repeats=300))[0] == MAX_JPEG_SCANS + 1  # stops counting past the limit


def test_a_repeated_scan_is_refused_before_decoding() -> None:
    with pytest.raises(ImageTooComplex):
        decode_image(scan_bomb(repeats=300), max_pixels=CAP, min_side=288)
    decode_image(progressive_jpeg(640, 480), max_pixels=CAP, min_side=288)  # an ordinary progressive photo


def test_thousands_of_segments_are_refused() -> None:
    with pytest.raises(ImageTooComplex):
        decode_image(segment_bomb(2000), max_pixels=CAP)
    decode_image(segment_bomb(100), max_pixels=CAP)


@pytest.mark.parametrize(
    "make",
    [lambda: sixteen_bit_png(6300, 6300), lambda: animated_webp(6300, 6300)],
    ids=["16-bit grey PNG 6300x6300", "animated WebP 6300x6300"],
)
def test_images_whose_decode_would_take_too_much_memory_are_refused(make) -> None:  # type: ignore[no-untyped-def]
    data = make()
    assert len(data) < 200_000  # tiny on the wire
    opened = Image.open(io.BytesIO(data))
    assert opened.size[0] * opened.size[1] < CAP  # under the pixel cap: the memory estimate is what refuses it
    assert decode_cost(opened, opened.format or "", 288) > MAX_DECODE_BYTES
    with pytest.raises(ImageTooComplex):
        decode_image(data, max_pixels=CAP, min_side=288)


def test_estimates_follow_depth_channels_frames_and_draft_scale() -> None:
    png16 = Image.open(io.BytesIO(sixteen_bit_png(100, 100)))
    assert decode_cost(png16, "PNG", None) == 100 * 100 * (2 + 16)  # converted whole: room for RGBA copies
    assert decode_cost(png16, "PNG", 20) == 100 * 100 * (2 + 4)  # shrunk first: one temporary
    webp = Image.open(io.BytesIO(animated_webp(100, 100)))
    assert decode_cost(webp, "WEBP", 20) == 100 * 100 * (8 + 4 + 4)  # two canvases, the previous frame's, reduce
    big = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(big, "JPEG")
    jpeg = Image.open(io.BytesIO(big.getvalue()))
    # Draft mode decodes at 1/8 here (500 x 375 keeps both sides >= 288): the image and its RGB copy, 4 bytes each.
    assert decode_cost(jpeg, "JPEG", 288) == (4000 * 3000 // 64) * 8
    assert decode_cost(jpeg, "JPEG", 288) < decode_cost(jpeg, "JPEG", None)


def test_an_overlong_side_is_refused_even_under_the_pixel_cap() -> None:
    buf = io.BytesIO()
    Image.new("L", (40000, 2)).save(buf, "PNG")
    with pytest.raises(TooManyPixels):
        decode_image(buf.getvalue(), max_pixels=CAP)


def test_sixteen_bit_grey_keeps_its_high_byte() -> None:
    arr = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(arr)))
    assert rgb[0, :, 0].tolist() == [0, 0, 1, 156, 255]
    small = np.array([[0, 7, 255]], dtype=np.uint16)  # nothing above 255: the values themselves
    assert np.asarray(to_rgb(Image.fromarray(small)))[0, :, 0].tolist() == [0, 7, 255]


def test_the_budget_refuses_what_does_not_fit_and_frees_on_exit() -> None:
    budget = DecodeBudget(100)
    with budget.reserve(60):
        with pytest.raises(Overloaded), budget.reserve(60):
            pass
        with budget.reserve(40):
            pass
    with budget.reserve(100), pytest.raises(Overloaded), budget.reserve(1):
        pass
    with budget.reserve(500):  # alone, a decode larger than the budget still runs (max_decode_bytes caps it)
        pass


def test_the_budget_holds_across_threads() -> None:
    budget = DecodeBudget(10)
    entered, release, refused = threading.Event(), threading.Event(), []

    def hold() -> None:
        with budget.reserve(8):
            entered.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    assert entered.wait(5)
    try:
        with budget.reserve(8):
            pass
    except Overloaded:
        refused.append(True)
    release.set()
    t.join(5)
    assert refused == [True]


@pytest.fixture
def capture() -> None:
    """pytest records warnings itself by swapping warnings.showwarning per test; the service installs its hook
    once at start (configure_logging), so here it is installed inside the test's own warnings context."""
    install_warning_capture()


@pytest.mark.usefixtures("capture")
def test_library_warnings_are_collected_never_printed(capfd: pytest.CaptureFixture[str]) -> None:
    with collect_warnings() as collected:
        image = decode_image(exif_warning_jpeg(5000), max_pixels=CAP, min_side=288)
    assert image.size == (64, 48)
    assert collected.count == 5000 and len(collected.messages) == 3
    assert all(len(m) < 250 for m in collected.messages)
    out, err = capfd.readouterr()
    assert "Skipping tag" not in out + err


@pytest.mark.usefixtures("capture")
def test_warnings_of_concurrent_decodes_stay_apart() -> None:
    counts: dict[int, int] = {}

    def decode(n: int) -> None:
        with collect_warnings() as collected:
            decode_image(exif_warning_jpeg(n), max_pixels=CAP)
        counts[n] = collected.count

    threads = [threading.Thread(target=decode, args=(n,)) for n in (10, 200, 3000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert counts == {10: 10, 200: 200, 3000: 3000}


@pytest.mark.parametrize("mode", ["I;16", "RGBA", "L", "P"])
def test_large_images_are_shrunk_before_conversion_and_keep_their_values(mode: str) -> None:
    """Over twice the size preprocessing needs: reduced by an integer box filter first (less memory), with the
    same colours as the plain conversion."""
    size = (1300, 1250)
    if mode == "I;16":
        source = Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16))
        expected = (156, 156, 156)
    else:
        source = Image.new("RGB", size, (200, 30, 30)).convert(mode)
        expected = to_rgb(source).getpixel((0, 0))
    buf = io.BytesIO()
    source.save(buf, "PNG")
    image = decode_image(buf.getvalue(), max_pixels=CAP, min_side=288)
    assert image.mode == "RGB" and image.getpixel((5, 5)) == expected
    assert min(image.size) >= 2 * 288 - 288 and (mode == "P" or max(image.size) < 1300)  # P is converted whole


def test_a_stray_byte_does_not_hide_the_scans() -> None:
    """libjpeg skips bytes between segments; so does the count (stopping there let 5,000 scans through)."""
    bomb = scan_bomb(repeats=300)
    hidden = bomb[:20] + b"\x00" + bomb[20:]  # after SOI and APP0
    assert jpeg_structure(hidden)[0] > MAX_JPEG_SCANS
    with pytest.raises(ImageTooComplex):
        decode_image(hidden, max_pixels=CAP, min_side=288)


def test_a_baseline_jpeg_with_a_scan_per_component_counts_its_coefficients() -> None:
    """Several scans in a baseline file make libjpeg buffer every coefficient at full size, as progressive does."""
    baseline = io.BytesIO()
    Image.new("RGB", (1200, 1000), (10, 20, 30)).save(baseline, "JPEG", subsampling=0)  # 4:4:4
    opened = Image.open(io.BytesIO(baseline.getvalue()))
    assert decode_cost(opened, "JPEG", 288, scans=3) >= decode_cost(opened, "JPEG", 288) + 1200 * 1000 * 2 * 3


def test_thousands_of_png_chunks_are_refused_before_pillow_walks_them() -> None:
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    data = png.getvalue()
    chunk = struct.pack(">I", 0) + b"prIv" + struct.pack(">I", zlib.crc32(b"prIv"))
    flood = data[:33] + chunk * 5000 + data[33:]  # after the signature and IHDR
    assert png_chunks(flood) > MAX_PNG_CHUNKS
    with pytest.raises(ImageTooComplex):
        decode_image(flood, max_pixels=CAP)
    decode_image(data[:33] + chunk * 100 + data[33:], max_pixels=CAP)


def test_a_palette_image_with_transparency_is_costed_as_converted_whole() -> None:
    image = Image.new("P", (4000, 4000))
    image.info["transparency"] = 0
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=0)
    opened = Image.open(io.BytesIO(buf.getvalue()))
    assert decode_cost(opened, "PNG", 288) == 4000 * 4000 * (1 + 16)


def test_small_decodes_never_wait_for_the_budget() -> None:
    budget = DecodeBudget(1024)
    with budget.reserve(1024):  # the budget is full
        image = decode_image(exif_warning_jpeg(1), max_pixels=CAP, budget=budget)  # a small photo still decodes
    assert image.size == (64, 48)
