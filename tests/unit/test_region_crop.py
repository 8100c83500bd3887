"""Region of interest (issue 19): a box in the photo as its user sees it (EXIF orientation applied), in pixels of
the photo as sent or fractions of it, validated against the header's size before any pixel is decoded, and
cropped before the photo is shrunk and converted."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pillow_heif
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin

from app.engine.imaging import Region, decode_image, stored_box
from app.errors import InvalidRegion

MAX = 40_000_000
pillow_heif.register_heif_opener()
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
# How a camera stores an upright scene for each EXIF orientation: the inverse of what the viewer applies.
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def quadrants(w: int = 400, h: int = 200) -> Image.Image:
    """Red | green over blue | yellow, as the user sees the photo."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2 :] = RED, GREEN
    a[h // 2 :, : w // 2], a[h // 2 :, w // 2 :] = BLUE, YELLOW
    return Image.fromarray(a)


def jpeg(image: Image.Image, orientation: int = 1, **kw: Any) -> bytes:
    """`image` as the user should see it, stored the way a camera would for `orientation`."""
    method = STORED[orientation]
    stored = image.transpose(method) if method is not None else image
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), **{"quality": 95, **kw})
    return buf.getvalue()


def colour(image: Image.Image) -> tuple[int, int, int]:
    """The image's mean colour, rounded to the nearest of the four (asserting it is close to one)."""
    mean = np.asarray(image, np.float32).reshape(-1, 3).mean(axis=0)
    best = min((RED, GREEN, BLUE, YELLOW), key=lambda c: float(np.abs(mean - c).sum()))
    assert float(np.abs(mean - best).max()) < 30, (mean, best)
    return best


def test_pixel_and_fraction_boxes_give_the_same_crop() -> None:
    data = jpeg(quadrants(), quality=90)
    px = decode_image(data, max_pixels=MAX, region=Region.parse("100,50,300,150"))
    frac = decode_image(data, max_pixels=MAX, region=Region.parse("0.25,0.25,0.75,0.75", "fraction"))
    assert px.size == frac.size == (200, 100)
    assert np.array_equal(np.asarray(px), np.asarray(frac))


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_a_box_on_a_rotated_jpeg_crops_what_the_user_sees(orientation: int) -> None:
    data = jpeg(quadrants(), orientation)
    assert Image.open(io.BytesIO(data)).size == ((200, 400) if orientation in (6, 8) else (400, 200))
    for box, expected in [
        ("10,10,190,90", RED),
        ("210,10,390,90", GREEN),
        ("10,110,190,190", BLUE),
        ("210,110,390,190", YELLOW),
    ]:
        out = decode_image(data, max_pixels=MAX, region=Region.parse(box))
        assert out.size == (180, 80)
        assert colour(out) == expected, (orientation, box)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_crops_as_orienting_first(orientation: int) -> None:
    """Cropping the stored image and then orienting it gives the pixels of orienting first and cropping."""
    rng = np.random.default_rng(orientation)
    upright = Image.fromarray(rng.integers(0, 255, (37, 53, 3), np.uint8))
    method = STORED[orientation]
    stored = upright.transpose(method) if method is not None else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif.tobytes())
    for box in [(3, 5, 20, 30), (0, 0, 53, 1), (52, 36, 53, 37), (10, 0, 11, 37)]:
        out = decode_image(buf.getvalue(), max_pixels=MAX, region=Region(*box))
        expected = ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))).crop(box)
        assert np.array_equal(np.asarray(out), np.asarray(expected)), (orientation, box)


def test_the_whole_photo_as_a_box_changes_nothing() -> None:
    data = jpeg(quadrants(1600, 1200), 6)
    whole = decode_image(data, max_pixels=MAX, min_side=288)
    boxed = decode_image(data, max_pixels=MAX, min_side=288, region=Region(0, 0, 1, 1, fractional=True))
    assert np.array_equal(np.asarray(whole), np.asarray(boxed))


def test_a_heic_box_is_in_the_rotated_photo() -> None:
    """libheif applies the rotation before the header size is read: the box is in the size the user sees."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    quadrants().transpose(Image.Transpose.ROTATE_90).save(buf, "HEIF", exif=exif.tobytes(), quality=90)
    out = decode_image(buf.getvalue(), max_pixels=MAX, region=Region.parse("210,110,390,190"))
    assert out.size == (180, 80) and colour(out) == YELLOW


# --- JPEG draft mode --------------------------------------------------------------------------------------------
def photo(w: int, h: int) -> Image.Image:
    """Smooth detail that survives draft mode's downscaling: comparable across scales."""
    x, y = np.meshgrid(np.linspace(0, 12, w), np.linspace(0, 9, h))
    a = np.stack([np.sin(x) * 100 + 128, np.cos(y) * 100 + 128, np.sin(x + y) * 100 + 128], axis=-1)
    return Image.fromarray(a.astype(np.uint8))


def test_draft_mode_crop_matches_a_full_decode_closely() -> None:
    data = jpeg(photo(3000, 4000), 6)  # stored 4000 x 3000, seen 3000 x 4000
    region = Region.parse("800,1200,2600,3600")
    draft = decode_image(data, max_pixels=MAX, min_side=224, region=region)
    full = decode_image(data, max_pixels=MAX, region=region)
    assert full.size == (1800, 2400)
    assert min(draft.size) >= 224 and draft.size[0] < 1800  # decoded at a reduced scale
    assert abs(draft.size[0] / draft.size[1] - 0.75) < 0.01
    small = full.resize(draft.size, Image.Resampling.BOX)
    diff = np.abs(np.asarray(draft, np.float32) - np.asarray(small, np.float32))
    assert float(diff.mean()) < 4.0 and float(np.percentile(diff, 99)) < 24


def test_a_small_box_in_a_large_photo_keeps_its_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Draft mode keeps the crop, not the photo, >= min_side: a 300 x 260 box in a 12 MP photo is decoded at full
    scale (the whole photo would be at 1/8) and not upscaled later."""
    data = jpeg(photo(4000, 3000))
    scales: list[tuple[int, int]] = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: Any, mode: str | None, size: tuple[int, int] | None) -> Any:
        result = draft(self, mode, size)
        scales.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    out = decode_image(data, max_pixels=MAX, min_side=224, region=Region.parse("1000,1000,1300,1260"))
    assert out.size == (300, 260) and scales == []  # no draft call: full scale
    out = decode_image(data, max_pixels=MAX, min_side=224, region=Region.parse("0,0,2000,1000"))
    assert scales == [(1000, 750)] and out.size == (500, 250)  # 1/4: the crop's short side stays >= 224
    scales.clear()
    decode_image(data, max_pixels=MAX, min_side=224)
    assert scales == [(500, 375)]  # the whole photo, as before: 1/8


def test_a_region_may_cost_more_memory_but_falls_back_to_a_coarser_scale() -> None:
    """A thin box in a large photo would need a full-scale decode; when that costs more than allowed, a coarser
    scale (up to the whole photo's) is used rather than refusing what the whole photo would be answered for."""
    data = jpeg(photo(4000, 3000))
    region = Region.parse("0,0,4000,250")  # short side 250: full scale for min_side 224
    out = decode_image(data, max_pixels=MAX, min_side=224, region=region, max_decode_bytes=30 * 2**20)
    assert out.size[0] < 4000  # fell back to a reduced scale within 30 MiB
    assert decode_image(data, max_pixels=MAX, min_side=224, region=region).size == (4000, 250)


# --- invalid boxes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("0,0,401,100", "px"),  # past the width
        ("0,0,100,201", "px"),  # past the height
        ("0,0,150,250", "px"),  # within the stored size, past the oriented one (checked on the rotated JPEG)
        ("0,0,1.01,1", "fraction"),
        ("-1,0,10,10", "px"),
        ("10,0,10,10", "px"),  # x1 == x2
        ("20,0,10,10", "px"),
        ("0,10,10,5", "px"),
        ("0.5,0.5,0.5012,0.9", "fraction"),  # 0.48 px wide at full size
        ("0,0,0.5,0.004", "fraction"),  # 0.8 px high
    ],
)
def test_invalid_boxes_are_refused_before_decoding(text: str, units: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = jpeg(quadrants(), 6 if text == "0,0,150,250" else 1)
    loaded: list[bool] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loaded.append(True))  # no pixel is decoded
    with pytest.raises(InvalidRegion) as exc:
        decode_image(data, max_pixels=MAX, region=Region.parse(text, units))
    assert exc.value.code == "invalid_bbox" and exc.value.status == 422 and exc.value.message
    assert loaded == []


def test_the_message_names_what_is_wrong() -> None:
    with pytest.raises(InvalidRegion, match=r"x2=500 .* width is 400 px"):
        decode_image(jpeg(quadrants()), max_pixels=MAX, region=Region.parse("0,0,500,100"))
    with pytest.raises(InvalidRegion, match="smaller than one pixel"):
        decode_image(jpeg(quadrants()), max_pixels=MAX, region=Region(0, 0, 0.001, 0.5, fractional=True))


@pytest.mark.parametrize(
    ("text", "units", "match"),
    [
        ("1,2,3", "px", "four comma-separated numbers"),
        ("1,2,3,4,5", "px", "four comma-separated numbers"),
        ("", "px", "four comma-separated numbers"),
        ("1,2,abc,4", "px", "x2 is not a number"),
        ("1,,3,4", "px", "y1 is not a number"),
        ("nan,0,1,1", "px", "finite"),
        ("0,0,inf,1", "px", "finite"),
        ("0,0,1,-inf", "px", "finite"),
        ("0,0,1,1", "percent", "bbox_units"),
        ("0,0,1,1", "", "bbox_units"),
        ("0,0,2,1", "fraction", "within 0..1"),
        ("5,0,1,1", "px", "x1 must be less than x2"),
        ("1" * 300, "px", "too long"),
    ],
)
def test_parse_errors(text: str, units: str, match: str) -> None:
    with pytest.raises(InvalidRegion, match=match) as exc:
        Region.parse(text, units)
    assert exc.value.code == "invalid_bbox"


def test_parse_accepts_spaces_and_decimals() -> None:
    assert Region.parse(" 1, 2.5 ,3e1,40 ") == Region(1.0, 2.5, 30.0, 40.0)
    assert Region.parse("0,0,1,1", "fraction").fractional


def test_region_is_checked_as_made() -> None:
    with pytest.raises(InvalidRegion):
        Region(0, 0, math.nan, 1)
    with pytest.raises(InvalidRegion):
        Region(0, 0, 1.5, 1, fractional=True)


def test_without_a_region_nothing_changes() -> None:
    data = jpeg(photo(1600, 1200), 6)
    out = decode_image(data, max_pixels=MAX, min_side=288, region=None)
    assert out.size == (400, 300)  # 1/4 draft, as without the keyword
    assert np.array_equal(np.asarray(out), np.asarray(decode_image(data, max_pixels=MAX, min_side=288)))


# --- property: any box either refused or cropped to its own size ------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    st.sampled_from(range(1, 9)),
    st.lists(st.floats(-0.2, 1.2) | st.sampled_from([math.nan, math.inf, -math.inf]), min_size=4, max_size=4),
    st.booleans(),
)
def test_any_box_is_refused_or_cropped_to_its_size(orientation: int, values: list[float], fractional: bool) -> None:
    size = (53, 37) if orientation < 5 else (37, 53)  # as stored
    scale = 1.0 if fractional else 60.0
    try:
        region = Region(*(v * scale for v in values), fractional=fractional)
        box = stored_box(region, size, orientation)
    except InvalidRegion:
        return
    if box is None:  # the whole image
        assert region.pixels(*(size if orientation < 5 else size[::-1]))[2] > size[0 if orientation < 5 else 1] - 0.5
        return
    assert 0 <= box[0] < box[2] <= size[0] and 0 <= box[1] < box[3] <= size[1]
