"""Decode cost bounded by what a request may spend, before any pixel is decoded: JPEG scans and segments
counted, decode memory estimated from the header, a shared budget for all requests, memory-frugal conversions,
and library warnings collected instead of printed (issue 16, classes 1-3)."""

from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pillow_heif
import pytest
from PIL import AvifImagePlugin, GifImagePlugin, Image
from pillow_heif.as_plugin import HeifImageFile

from app.engine.imaging import (
    MAX_BMFF_BOXES,
    MAX_DECODE_BYTES,
    MAX_GIF_BLOCKS,
    MAX_JPEG_SCANS,
    MAX_PNG_CHUNKS,
    DecodeBudget,
    collect_warnings,
    container_frames,
    decode_cost,
    decode_image,
    gif_structure,
    install_warning_capture,
    jpeg_structure,
    png_chunks,
    to_rgb,
)
from app.errors import CorruptImage, ImageTooComplex, Overloaded, TooManyPixels, UnsupportedFormat
from tests.hostile import (
    animated_webp,
    avif_understated,
    exif_warning_jpeg,
    gif_extension_flood,
    gif_screen,
    heic_grid_understated,
    many_frame_gif,
    progressive_jpeg,
    scan_bomb,
    segment_bomb,
    sixteen_bit_png,
)

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


# --- phone formats and GIF (issue 19) ---------------------------------------------------------------------------
@pytest.fixture
def plugins_never_open(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every GIF, AVIF or HEIF plugin that starts parsing: refusals from the header must leave it empty."""
    opened: list[str] = []
    for cls in (GifImagePlugin.GifImageFile, AvifImagePlugin.AvifImageFile, HeifImageFile):
        original = cls._open

        def spy(self: Image.Image, original=original, name: str = cls.__name__) -> None:  # type: ignore[no-untyped-def]
            opened.append(name)
            original(self)

        monkeypatch.setattr(cls, "_open", spy)
    return opened


def test_a_huge_gif_screen_is_refused_before_pillow_opens_it(plugins_never_open: list[str]) -> None:
    data = gif_screen(30000, 30000)
    assert len(data) < 64
    with pytest.raises(TooManyPixels):
        decode_image(data, max_pixels=CAP)
    assert plugins_never_open == []


def test_a_gif_frame_past_its_screen_grows_the_canvas_and_is_refused_before_pillow(
    plugins_never_open: list[str],
) -> None:
    """Pillow grows the canvas to the first frame's extent and fills a disposal buffer of the frame's size as it
    opens the file: a 9000^2 frame on an 8x8 screen would allocate 81 MB before any check of ours."""
    data = gif_screen(8, 8, frame=(0, 0, 9000, 9000), disposal=2)
    assert gif_structure(data)[:2] == (9000, 9000)
    with pytest.raises(TooManyPixels):
        decode_image(data, max_pixels=CAP)
    assert plugins_never_open == []
    buf = io.BytesIO()
    Image.new("P", (4, 4), 1).save(buf, "GIF")
    small = bytearray(buf.getvalue())
    small[6:10] = struct.pack("<HH", 2, 2)  # a 2x2 screen
    frame = small.index(b",", 13)
    small[frame + 1 : frame + 5] = struct.pack("<HH", 4, 4)  # the 4x4 frame at (4, 4)
    assert decode_image(bytes(small), max_pixels=CAP).size == (8, 8) == gif_structure(bytes(small))[:2]


def test_a_gif_canvas_under_the_pixel_cap_is_costed_as_converted_whole() -> None:
    data = gif_screen(6000, 6000)
    opened = Image.open(io.BytesIO(data))
    assert decode_cost(opened, "GIF", 288) == 6000 * 6000 * (3 + 16) > MAX_DECODE_BYTES
    with pytest.raises(ImageTooComplex):
        decode_image(data, max_pixels=CAP, min_side=288)


def test_gif_blocks_before_the_first_frame_are_counted() -> None:
    assert gif_structure(gif_extension_flood(5000))[2] > MAX_GIF_BLOCKS
    with pytest.raises(ImageTooComplex):
        decode_image(gif_extension_flood(5000), max_pixels=CAP)
    assert decode_image(gif_extension_flood(1000), max_pixels=CAP).size == (8, 8)


def test_only_the_first_gif_frame_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's GIF reader walks frames in Python; n_frames would walk them all. Frame 0 only, here."""
    data = many_frame_gif(3000)
    seeks: list[int] = []
    original = GifImagePlugin.GifImageFile._seek

    def spy(self: GifImagePlugin.GifImageFile, frame: int, update_image: bool = True) -> None:
        seeks.append(frame)
        original(self, frame, update_image)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", spy)
    image = decode_image(data, max_pixels=CAP)
    assert seeks == [0] and image.getpixel((4, 4)) == (255, 0, 0)


def test_an_avif_understating_its_frame_is_costed_by_the_frame() -> None:
    """libavif decodes the AV1 frame at its own size whatever `ispe` says: the sequence header's maximum frame
    size is what is checked and costed."""
    data = avif_understated(1024)
    assert Image.open(io.BytesIO(data)).size == (64, 64)  # what the header says
    assert container_frames(data, "AVIF") == (1024 * 1024, 1024)
    with pytest.raises(TooManyPixels):
        decode_image(data, max_pixels=500_000)
    with pytest.raises(ImageTooComplex):  # 1 MP decoded: 24 MB by the rule, over a 4 MiB allowance
        decode_image(data, max_pixels=CAP, max_decode_bytes=4 * 2**20)
    honest = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 30, 200)).save(honest, "AVIF")
    assert decode_image(honest.getvalue(), max_pixels=500_000, max_decode_bytes=4 * 2**20).size == (64, 64)


def test_an_avif_without_a_sequence_header_is_corrupt() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (1, 2, 3)).save(buf, "AVIF")
    data = buf.getvalue()
    header = data.index(b"\x12\x00\x0a")  # temporal delimiter, then the sequence header OBU
    damaged = data[: header + 2] + b"\x32" + data[header + 3 :]  # now a frame OBU
    with pytest.raises(CorruptImage):
        decode_image(damaged, max_pixels=CAP)


def test_a_heic_grid_understating_its_size_is_costed_by_the_grid(plugins_never_open: list[str]) -> None:
    """libheif decodes a grid at its descriptor's size before comparing it with `ispe` (4096^2 inside 64x64:
    +28 MB, then refused): the descriptor is read first."""
    data = heic_grid_understated(1024, 512, 64)
    assert container_frames(data, "HEIF") == (1024 * 1024, 1024)
    with pytest.raises(TooManyPixels):
        decode_image(data, max_pixels=500_000)
    assert plugins_never_open == []


def test_a_heic_stream_larger_than_its_header_is_refused_by_libheif() -> None:
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (512, 512), (120, 30, 200)).save(buf, "HEIF", quality=30)
    data = buf.getvalue()
    i = data.index(b"ispe")
    lying = data[: i + 8] + struct.pack(">II", 64, 64) + data[i + 16 :]
    with pytest.raises(CorruptImage):  # libheif: "exceeds the maximum image size 4096"
        decode_image(lying, max_pixels=CAP)


def test_huge_heic_and_avif_headers_are_refused_before_their_decoder(plugins_never_open: list[str]) -> None:
    pillow_heif.register_heif_opener()
    for fmt in ("HEIF", "AVIF"):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64)).save(buf, fmt)
        data = buf.getvalue()
        i = data.index(b"ispe")
        with pytest.raises(TooManyPixels):
            decode_image(data[: i + 8] + struct.pack(">II", 30000, 30000) + data[i + 16 :], max_pixels=CAP)
    assert plugins_never_open == []


def test_a_heic_whose_primary_is_not_hevc_is_unsupported() -> None:
    pillow_heif.register_heif_opener()
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "HEIF")
    with pytest.raises(UnsupportedFormat):  # libheif's uncompressed codec: not what a phone or camera writes
        decode_image(buf.getvalue().replace(b"hvc1", b"unci"), max_pixels=CAP)


def test_a_flood_of_boxes_is_refused() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "AVIF")
    data = buf.getvalue()
    free = b"\x00\x00\x00\x08free"  # empty boxes after the file's own: its offsets stay right
    with pytest.raises(ImageTooComplex):
        decode_image(data + free * (MAX_BMFF_BOXES + 10), max_pixels=CAP)
    assert decode_image(data + free * 100, max_pixels=CAP).size == (16, 16)


def test_estimates_for_heif_avif_and_gif() -> None:
    pillow_heif.register_heif_opener()
    opened = {}
    for fmt, mode in (("HEIF", "RGB"), ("AVIF", "RGB"), ("AVIF", "RGBA"), ("GIF", "P")):
        buf = io.BytesIO()
        Image.new(mode, (1000, 800)).save(buf, fmt)
        opened[fmt, mode] = Image.open(io.BytesIO(buf.getvalue()))
    px = 1000 * 800
    assert decode_cost(opened["HEIF", "RGB"], "HEIF", 100) == px * (8 + 4)  # libheif's image + Pillow's, reduce
    assert decode_cost(opened["AVIF", "RGB"], "AVIF", 100) == px * (8 + 4)
    assert decode_cost(opened["AVIF", "RGBA"], "AVIF", 100) == px * (12 + 4)  # + the alpha plane's decode
    assert decode_cost(opened["GIF", "P"], "GIF", 100) == px * (3 + 16)  # canvas, disposal buffer, whole
    assert decode_cost(opened["HEIF", "RGB"], "HEIF", 100, codec_pixels=4 * px) == 4 * px * (8 + 4)
    # A region: the whole image stays decoded while its crop is copied and converted.
    assert decode_cost(opened["HEIF", "RGB"], "HEIF", 100, crop=(300, 200)) == px * 8 + 300 * 200 * (4 + 16)


def test_a_jpeg_region_is_costed_at_the_crop_s_scale() -> None:
    big = io.BytesIO()
    Image.new("RGB", (4000, 3000)).save(big, "JPEG")
    jpeg = Image.open(io.BytesIO(big.getvalue()))
    whole = decode_cost(jpeg, "JPEG", 288)
    assert whole == (4000 * 3000 // 64) * 8  # 1/8
    small_box = decode_cost(jpeg, "JPEG", 288, crop=(400, 300))  # full scale: the crop is under 2 x 288
    assert small_box == 4000 * 3000 * 4 + 400 * 300 * 8
    assert decode_cost(jpeg, "JPEG", 288, crop=(400, 300), scale=8) == (4000 * 3000 // 64) * 4 + (400 * 300 // 64) * 8
