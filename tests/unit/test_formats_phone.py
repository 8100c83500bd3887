"""Phone formats and GIF (issue 19): HEIC/HEIF (pillow-heif), AVIF (Pillow's plugin) and GIF are sniffed from
their bytes, decoded to RGB with one frame and one orientation, and each reaches its own plugin only."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pillow_heif
import pytest
from PIL import AvifImagePlugin, GifImagePlugin, Image, JpegImagePlugin
from pillow_heif.as_plugin import HeifImageFile

from app.engine.imaging import AVIF, GIF, HEIF, decode_image, sniff_format
from app.errors import CorruptImage, UnsupportedFormat

MAX = 40_000_000
pillow_heif.register_heif_opener()  # to write HEIC here; the decoder registers its own options

# The four quadrants of a 64 x 32 photo, as its user sees it: red | green over blue | yellow.
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def quadrants(w: int = 64, h: int = 32) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = RED, GREEN
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = BLUE, YELLOW
    return Image.fromarray(a)


def encode(image: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def near(pixel: object, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    assert isinstance(pixel, tuple)
    return all(abs(int(a) - b) <= tolerance for a, b in zip(pixel[:3], colour, strict=True))


def assert_upright(image: Image.Image, w: int = 64, h: int = 32) -> None:
    """The quadrants where the user sees them: one rotation, never two."""
    assert image.mode == "RGB" and image.size == (w, h)
    assert near(image.getpixel((w // 4, h // 4)), RED)
    assert near(image.getpixel((3 * w // 4, h // 4)), GREEN)
    assert near(image.getpixel((w // 4, 3 * h // 4)), BLUE)
    assert near(image.getpixel((3 * w // 4, 3 * h // 4)), YELLOW)


# How a camera stores an upright scene for each EXIF orientation: the inverse of what the viewer applies.
STORED = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}


def test_sniffs_the_new_formats() -> None:
    img = quadrants()
    assert sniff_format(encode(img, "HEIF")) == HEIF
    assert sniff_format(encode(img, "AVIF")) == AVIF
    assert sniff_format(encode(img, "GIF")) == GIF
    assert sniff_format(b"GIF87a" + b"\0" * 20) == GIF


@pytest.mark.parametrize(
    ("brands", "fmt"),
    [
        (b"mif1\0\0\0\0mif1avif", AVIF),
        (b"msf1\0\0\0\0msf1avis", AVIF),
        (b"mif1\0\0\0\0mif1heic", HEIF),
        (b"mif1\0\0\0\0mif1miaf", HEIF),  # a generic HEIF: libheif decides
        (b"heix\0\0\0\0mif1heix", HEIF),
        (b"hevc\0\0\0\0msf1hevc", HEIF),
        (b"avis\0\0\0\0avis", AVIF),
    ],
)
def test_ftyp_brands(brands: bytes, fmt: str) -> None:
    ftyp = (8 + len(brands)).to_bytes(4, "big") + b"ftyp" + brands
    assert sniff_format(ftyp + b"\0" * 16) == fmt


@pytest.mark.parametrize("brand", [b"isom", b"mp42", b"qt  ", b"crx ", b"M4A ", b"jp2 "])
def test_other_iso_media_files_are_unsupported(brand: bytes) -> None:
    data = b"\x00\x00\x00\x18ftyp" + brand + b"\0\0\0\0" + brand + b"\0" * 40
    with pytest.raises(UnsupportedFormat):
        decode_image(data, max_pixels=MAX)


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [("HEIF", {"quality": 90}), ("AVIF", {"quality": 90}), ("GIF", {})],
)
def test_each_format_decodes_upright_to_rgb(fmt: str, kw: dict[str, Any]) -> None:
    assert_upright(decode_image(encode(quadrants(), fmt, **kw), max_pixels=MAX))


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_only_the_sniffed_plugin_runs(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    for cls in (JpegImagePlugin.JpegImageFile, GifImagePlugin.GifImageFile, AvifImagePlugin.AvifImageFile,
                HeifImageFile):  # fmt: skip
        original = cls._open

        def spy(self: Any, original: Any = original, name: str = cls.__name__) -> None:
            opened.append(name)
            original(self)

        monkeypatch.setattr(cls, "_open", spy)
    decode_image(encode(quadrants(), fmt), max_pixels=MAX)
    assert opened == ["HeifImageFile" if fmt == "HEIF" else "AvifImageFile"]


@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_orientation_is_applied_once(fmt: str, orientation: int) -> None:
    """Both writers store EXIF orientation as the container's rotation (irot/imir). pillow-heif's libheif
    applies it as it decodes and leaves the EXIF tag in the file: the decoder must not rotate again; Pillow's
    AVIF plugin reports it as the EXIF orientation, which the decoder applies."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(quadrants().transpose(STORED[orientation]), fmt, exif=exif.tobytes(), quality=90)
    assert_upright(decode_image(data, max_pixels=MAX))


def test_heic_exif_orientation_left_in_place_does_not_rotate_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """pillow-heif resets the EXIF (and XMP) orientation of a HEIC it has rotated; were it to leave them (an older
    or newer version, a tag form it does not parse), the decoder still rotates once: libheif's rotation only."""
    monkeypatch.setattr(pillow_heif.as_plugin, "set_orientation", lambda info: None)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(quadrants().transpose(STORED[6]), "HEIF", exif=exif.tobytes(), quality=90)
    opened = Image.open(io.BytesIO(data))
    assert opened.size == (64, 32) and opened.getexif().get(0x0112) == 6  # rotated by libheif, and still tagged
    assert_upright(decode_image(data, max_pixels=MAX))


def test_gif_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    out = decode_image(encode(image, "GIF", transparency=0), max_pixels=MAX)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((4, 4)) == (200, 30, 30)


def test_grey_gif_transparency_is_composited_on_white() -> None:
    """A grey palette opens as mode L with a transparent value: converted whole, composited, never averaged."""
    image = Image.new("L", (1300, 1250), 90)
    image.paste(0, (0, 0, 650, 1250))
    data = encode(image, "GIF", transparency=0, optimize=False)  # the whole grey ramp: Pillow reads it as L
    assert Image.open(io.BytesIO(data)).mode == "L"
    out = decode_image(data, max_pixels=MAX, min_side=288)
    assert out.getpixel((10, 10)) == (255, 255, 255) and out.getpixel((1000, 10)) == (90, 90, 90)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_alpha_is_composited_on_white(fmt: str) -> None:
    out = decode_image(encode(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), fmt, quality=90), max_pixels=MAX)
    assert out.mode == "RGB" and near(out.getpixel((8, 8)), (255, 255, 255), 8)


def test_ten_bit_heic_becomes_eight_bit_rgb() -> None:
    rgb16 = np.full((16, 16, 3), 40000, np.uint16)
    heif = pillow_heif.from_bytes(mode="RGB;16", size=(16, 16), data=rgb16.tobytes())
    buf = io.BytesIO()
    heif.save(buf, quality=95)
    assert Image.open(io.BytesIO(buf.getvalue())).info.get("bit_depth") == 10
    out = decode_image(buf.getvalue(), max_pixels=MAX)
    assert out.mode == "RGB" and near(out.getpixel((8, 8)), (156, 156, 156), 3)


def test_ten_bit_grey_heic_is_sixteen_bit_in_pillow_and_rgb_out() -> None:
    data = encode(Image.fromarray(np.full((16, 16), 40000, np.uint16)), "HEIF", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = decode_image(data, max_pixels=MAX)
    assert out.mode == "RGB" and near(out.getpixel((8, 8)), (156, 156, 156), 3)


@pytest.mark.parametrize("fmt", ["GIF", "AVIF", "HEIF"])
def test_a_sequence_decodes_its_first_frame_only(fmt: str) -> None:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert near(decode_image(data, max_pixels=MAX).getpixel((16, 16)), RED)


def test_a_heic_decodes_its_primary_image_not_the_first() -> None:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    data = encode(frames[0], "HEIF", save_all=True, append_images=frames[1:], primary_index=1)
    assert near(decode_image(data, max_pixels=MAX).getpixel((16, 16)), BLUE)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "GIF"])
def test_truncated_files_are_corrupt(fmt: str) -> None:
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), fmt)
    for cut in (len(data) // 2, len(data) - 20, 40):
        with pytest.raises(CorruptImage):
            decode_image(data[:cut], max_pixels=MAX)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_corrupted_coded_data_fails_cleanly(fmt: str) -> None:
    """Bytes of the coded picture overwritten: refused, or decoded to some RGB image of the declared size (a
    codec may conceal damage), never another exception."""
    data = bytearray(encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)), fmt))
    mdat = data.index(b"mdat")
    data[mdat + 40 : mdat + 200] = bytes(range(160))
    try:
        out = decode_image(bytes(data), max_pixels=MAX)
    except CorruptImage:
        return
    assert out.mode == "RGB" and out.size == (64, 64)


def test_heif_is_registered_once_with_its_options() -> None:
    decode_image(encode(quadrants(), "HEIF"), max_pixels=MAX)
    assert pillow_heif.options.DECODE_THREADS == 1 and not pillow_heif.options.THUMBNAILS
    assert AvifImagePlugin.DEFAULT_MAX_THREADS == 1
