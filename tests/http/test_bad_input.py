"""The bad-input matrix, over real HTTP against a real index: every hostile or odd upload gets a 4xx JSON error
with a stable code (never a 500), or, where the input is a valid image in disguise, a normal answer with finite
scores. Formats outside JPEG/PNG/WebP/HEIC/AVIF/GIF never reach their Pillow plugin."""

from __future__ import annotations

import asyncio
import io
import math
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pillow_heif
import psutil
import pytest
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    PsdImagePlugin,
    TiffImagePlugin,
)

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import encode, live_server, product_image
from tests.hostile import avif_understated, gif_extension_flood, gif_screen, heic_grid_understated

CAP = 256 * 1024
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(faiss_index: Path, tiny_model: Path) -> Iterator[str]:
    settings = Settings(
        index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, max_upload_bytes=CAP, max_image_pixels=MAX_PIXELS
    )
    with live_server(create_app(settings)) as base:
        yield base


def post(server: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server}/search", timeout=30, **kwargs)


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text


def assert_answer(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text[:300]
    body: dict[str, Any] = r.json()
    assert body["results"], "a real image gets results"
    assert all(math.isfinite(x["score"]) for x in body["results"])
    return body


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height (RGB, 8 bit) with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def apple(fmt: str = "JPEG", **kw: Any) -> bytes:
    return encode(product_image("red-apple", 11), fmt, **kw)


# --- transport and framing --------------------------------------------------------------------------------------
def test_empty_body(server: str) -> None:
    assert_error(post(server, content=b""), 400, "empty_body")


def test_empty_image_part(server: str) -> None:
    assert_error(post(server, files={"image": ("q.jpg", b"", "image/jpeg")}), 400, "empty_body")


@pytest.mark.parametrize("field", ["photo", "Image", "file"])
def test_missing_or_misnamed_field(server: str, field: str) -> None:
    assert_error(post(server, files={field: ("q.jpg", apple(), "image/jpeg")}), 400, "missing_image")


def test_form_without_a_file(server: str) -> None:
    assert_error(post(server, data={"note": "hello"}, files={"x": ("a", b"b")}), 400, "missing_image")


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/x-www-form-urlencoded"])
def test_wrong_content_type_with_a_non_image(server: str, content_type: str) -> None:
    assert_error(
        post(server, content=b'{"image": "x"}', headers={"content-type": content_type}), 415, "unsupported_format"
    )


def test_wrong_content_type_with_a_real_image_is_sniffed(server: str) -> None:
    assert_answer(post(server, content=apple(), headers={"content-type": "application/octet-stream"}))


def test_png_sent_as_jpeg_is_accepted(server: str) -> None:
    assert_answer(post(server, files={"image": ("q.jpg", apple("PNG"), "image/jpeg")}))


@pytest.mark.parametrize(
    "body",
    [b"--b\r\nbroken", b"--b\r\nContent-Disposition: form-data\r\n\r\nx", b"no boundary at all"],
)
def test_malformed_multipart(server: str, body: bytes) -> None:
    r = post(server, content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 400 and r.json()["error"]["code"] in ("invalid_multipart", "missing_image")


def test_many_file_parts(server: str) -> None:
    files = [("image", (f"{i}.jpg", apple(), "image/jpeg")) for i in range(10)]
    assert_error(post(server, files=files), 400, "invalid_multipart")


def test_huge_form_field(server: str) -> None:
    r = post(server, data={"comment": "x" * 200_000}, files={"image": ("q.jpg", apple(), "image/jpeg")})
    assert r.status_code in (400, 413) and r.json()["error"]["code"] in ("invalid_multipart", "image_too_large")


@pytest.mark.parametrize(
    "filename", ["../../../etc/passwd", "..\\..\\boot.ini", "/dev/zero", "a\x00b.jpg", "x" * 5000, "ü🙂.jpg"]
)
def test_hostile_filenames_are_ignored(server: str, filename: str, tmp_path: Path) -> None:
    r = post(server, files={"image": (filename, apple(), "image/jpeg")})
    assert r.status_code in (200, 400), r.text[:200]
    if r.status_code == 200:
        assert filename not in r.text  # never echoed, never used as a path
    else:
        assert r.json()["error"]["code"] == "invalid_multipart"


# --- size limits ------------------------------------------------------------------------------------------------
def padded_jpeg(total: int) -> bytes:
    """A valid JPEG padded after its end marker to exactly `total` bytes (decoders ignore trailing bytes)."""
    data = apple()
    assert len(data) < total
    return data + b"\0" * (total - len(data))


def test_exactly_at_the_byte_cap_is_accepted(server: str) -> None:
    assert_answer(post(server, content=padded_jpeg(CAP)))


def test_one_byte_over_the_cap_with_content_length(server: str) -> None:
    assert_error(post(server, content=padded_jpeg(CAP + 1)), 413, "image_too_large")


def test_one_byte_over_the_cap_without_content_length(server: str) -> None:
    data = padded_jpeg(CAP + 1)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 8192):
            yield data[i : i + 8192]

    assert_error(post(server, content=chunks()), 413, "image_too_large")


def test_pixels_exactly_at_the_cap_are_accepted(server: str) -> None:
    assert_answer(post(server, content=encode(Image.new("RGB", (1000, 1000), (200, 30, 30)), "PNG")))


def test_one_row_over_the_pixel_cap(server: str) -> None:
    assert_error(
        post(server, content=encode(Image.new("RGB", (1000, 1001), (200, 30, 30)), "PNG")), 422, "too_many_pixels"
    )


def test_decompression_bomb_is_refused_from_the_header_with_flat_memory(server: str) -> None:
    bomb = png_declaring(30000, 30000)
    assert len(bomb) < 4096
    rss = psutil.Process().memory_info().rss
    for _ in range(5):
        assert_error(post(server, content=bomb), 422, "too_many_pixels")
    assert psutil.Process().memory_info().rss - rss < 50 * 1024 * 1024


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0)])
def test_zero_dimensions(server: str, size: tuple[int, int]) -> None:
    r = post(server, content=png_declaring(*size))
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_image"


def test_huge_dimensions_in_the_header(server: str) -> None:
    assert_error(post(server, content=png_declaring(2**31 - 1, 2**31 - 1)), 422, "too_many_pixels")


@pytest.mark.parametrize("size", [(1, 1), (1, 20000), (20000, 1), (3, 4)])
def test_tiny_and_extreme_shapes_are_answered(server: str, size: tuple[int, int]) -> None:
    assert_answer(post(server, content=encode(Image.new("RGB", size, (200, 30, 30)), "PNG")))


# --- formats ----------------------------------------------------------------------------------------------------
PSD = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 80, 96, 8, 3) + b"\0" * 64
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>'
OTHER_FORMATS = {
    "TIFF": (lambda: apple("TIFF"), TiffImagePlugin.TiffImageFile),
    "BMP": (lambda: apple("BMP"), BmpImagePlugin.BmpImageFile),
    "PSD": (
        lambda: b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 80, 96, 8, 3) + b"\0" * 64,
        PsdImagePlugin.PsdImageFile,
    ),
    "PDF": (lambda: apple("PDF"), None),
    "SVG": (
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>',
        None,
    ),
}


@pytest.mark.parametrize("fmt", sorted(OTHER_FORMATS))
def test_other_formats_are_415_and_their_plugin_never_runs(
    server: str, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, image_class = OTHER_FORMATS[fmt]
    data = make()
    opened: list[str] = []
    for cls in (GifImagePlugin.GifImageFile, TiffImagePlugin.TiffImageFile, BmpImagePlugin.BmpImageFile,
                PsdImagePlugin.PsdImageFile):  # fmt: skip
        original = cls._open

        def spy(self: Any, original: Any = original, name: str = cls.__name__) -> None:
            opened.append(name)
            original(self)

        monkeypatch.setattr(cls, "_open", spy)
    if image_class is not None:
        Image.open(io.BytesIO(data)).close()  # the spy works: the plugin does run when Pillow is asked directly
        assert opened
        opened.clear()
    assert_error(post(server, content=data, headers={"content-type": "image/jpeg"}), 415, "unsupported_format")
    assert opened == []


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), id="random"),
        pytest.param(b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>", id="html"),
    ],
)
def test_non_images_are_415(server: str, data: bytes) -> None:
    assert_error(post(server, content=data), 415, "unsupported_format")


def test_zip_is_415(server: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.txt", "hello")
    assert_error(post(server, content=buf.getvalue()), 415, "unsupported_format")


def test_jpeg_zip_polyglot_is_read_as_the_jpeg(server: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.sh", "rm -rf /")
    assert_answer(post(server, content=apple() + buf.getvalue()))


def test_truncated_jpeg(server: str) -> None:
    assert_error(post(server, content=apple()[:400]), 400, "corrupt_image")


def test_crc_broken_png(server: str) -> None:
    data = bytearray(apple("PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    assert_error(post(server, content=bytes(data)), 400, "corrupt_image")


def test_many_frame_animations_decode_the_first_frame_only(server: str) -> None:
    frames = [product_image("red-apple", 0, size=(48, 40))] + [
        Image.new("RGB", (48, 40), (i, 255 - i, 0)) for i in range(300)
    ]
    for fmt in ("WEBP", "PNG", "GIF", "AVIF"):
        buf = io.BytesIO()
        frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:])
        assert len(buf.getvalue()) <= CAP
        rss = psutil.Process().memory_info().rss
        body = assert_answer(post(server, content=buf.getvalue()))
        assert body["results"][0]["sku"] == "red-apple"
        assert psutil.Process().memory_info().rss - rss < 50 * 1024 * 1024


def _modes() -> dict[str, bytes]:
    rgb = product_image("green-apple", 4)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    return {
        "CMYK JPEG": encode(rgb.convert("CMYK"), "JPEG"),
        "16-bit PNG": encode(Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257), "PNG"),
        "palette + transparency": buf.getvalue(),
        "LA": encode(rgb.convert("LA"), "PNG"),
        "1-bit": encode(rgb.convert("1"), "PNG"),
        "transparent RGBA": encode(Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "PNG"),
        "grey WebP": encode(rgb.convert("L"), "WEBP"),
        "black": encode(Image.new("RGB", (64, 64), (0, 0, 0)), "PNG"),
        "white": encode(Image.new("RGB", (64, 64), (255, 255, 255)), "JPEG"),
    }


@pytest.mark.parametrize("name", sorted(_modes()))
def test_every_mode_and_constant_image_gets_finite_scores(server: str, name: str) -> None:
    r = post(server, content=_modes()[name])
    assert_answer(r)
    assert "NaN" not in r.text and "Infinity" not in r.text


def test_exif_rotated_photo_matches_the_upright_one(server: str) -> None:
    upright = product_image("blue-milk", 3, size=(96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displayed 90 degrees clockwise = upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    a = assert_answer(post(server, content=encode(upright, "JPEG", quality=95)))
    b = assert_answer(post(server, content=encode(stored, "JPEG", quality=95, exif=exif.tobytes())))
    assert a["results"][0]["sku"] == b["results"][0]["sku"] == "blue-milk"


def test_giant_metadata(server: str) -> None:
    base = apple()
    comment = b"\xff\xfe" + struct.pack(">H", 65535) + b"C" * 65533  # one maximal COM segment, repeated
    data = base[:2] + comment * 3 + base[2:]
    assert len(data) < CAP
    assert_answer(post(server, content=data))
    text = b"tEXtComment\0" + b"x" * 200_000
    png = bytearray(apple("PNG"))
    idat = png.index(b"IDAT") - 4
    png[idat:idat] = png_chunk(text[:4], text[4:])
    r = post(server, content=bytes(png))
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        assert r.json()["error"]["code"] == "corrupt_image"


# --- parameters -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", ["0", "-1", "1e9", "abc", "101", "1.5", ""])
def test_bad_k(server: str, k: str) -> None:
    assert_error(post(server, content=apple(), params={"k": k}), 422, "invalid_parameter")


@pytest.mark.parametrize(
    "params",
    [{"min_score": "nan"}, {"min_score": "2"}, {"probe_mass": "0"}, {"probe_mass": "1.5"}, {"max_probes": "0"}],
)
def test_bad_parameters(server: str, params: dict[str, str]) -> None:
    assert_error(post(server, content=apple(), params=params), 422, "invalid_parameter")


def test_unknown_category(server: str) -> None:
    assert_error(post(server, content=apple(), params={"category": "../../etc"}), 422, "unknown_category")


@pytest.mark.parametrize("declare_length", [False, True])
def test_at_most_cap_plus_one_bytes_are_read(faiss_index: Path, tiny_model: Path, declare_length: bool) -> None:
    """Straight ASGI, one byte per receive() message, so the count of bytes the app pulls is exact."""
    cap = 1024
    app = create_app(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, max_upload_bytes=cap))
    body = b"\xff\xd8\xff" + b"\0" * (10 * cap)
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(body):
            pulled += 1
            return {"type": "http.request", "body": body[pulled - 1 : pulled], "more_body": pulled < len(body)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(b"content-type", b"image/jpeg")]
    if declare_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/search", "raw_path": b"/search", "query_string": b"", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": ""}  # fmt: skip

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(scenario())
    assert sent[0]["status"] == 413
    assert pulled == (0 if declare_length else cap + 1)


# --- phone formats and GIF (issue 19) ---------------------------------------------------------------------------
pillow_heif.register_heif_opener()  # to write HEIC here


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "GIF"])
@pytest.mark.parametrize("content_type", ["image/heic", "image/avif", "image/gif", "application/octet-stream"])
def test_phone_formats_and_gif_are_answered(server: str, fmt: str, content_type: str) -> None:
    """Whatever the Content-Type says, the bytes decide."""
    body = assert_answer(post(server, content=apple(fmt, quality=90) if fmt != "GIF" else apple("GIF"),
                              headers={"content-type": content_type}))  # fmt: skip
    assert body["results"][0]["sku"] == "red-apple"


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_rotated_phone_photo_matches_the_upright_one(server: str, fmt: str) -> None:
    upright = product_image("blue-milk", 3, size=(96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displayed 90 degrees clockwise = upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    body = assert_answer(post(server, content=encode(stored, fmt, quality=95, exif=exif.tobytes())))
    assert body["results"][0]["sku"] == "blue-milk"


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "GIF"])
def test_truncated_phone_formats_and_gif(server: str, fmt: str) -> None:
    data = apple(fmt)
    for cut in (len(data) // 2, 100):
        assert_error(post(server, content=data[:cut]), 400, "corrupt_image")


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_corrupted_phone_formats_never_500(server: str, fmt: str) -> None:
    rng = np.random.default_rng(7)
    data = apple(fmt)
    for _ in range(20):
        damaged = bytearray(data)
        for pos in rng.integers(0, len(data), 8):
            damaged[pos] ^= 1 << int(rng.integers(0, 8))
        r = post(server, content=bytes(damaged))
        assert r.status_code in (200, 400, 415, 422), (r.status_code, r.text[:300])


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        pytest.param(lambda: gif_screen(30000, 30000), 422, "too_many_pixels", id="gif-huge-screen"),
        pytest.param(
            lambda: gif_screen(8, 8, frame=(0, 0, 9000, 9000), disposal=2), 422, "too_many_pixels", id="gif-frame-past"
        ),
        pytest.param(lambda: gif_extension_flood(5000), 422, "image_too_complex", id="gif-block-flood"),
        pytest.param(lambda: avif_understated(1100), 422, "too_many_pixels", id="avif-understated-frame"),
        pytest.param(lambda: heic_grid_understated(1024, 512, 64), 422, "too_many_pixels", id="heic-understated-grid"),
    ],
)
def test_phone_format_and_gif_bombs_are_refused_with_flat_memory(server: str, make, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    data = make()
    assert len(data) < 20_000
    rss = psutil.Process().memory_info().rss
    for _ in range(3):
        assert_error(post(server, content=data), status, code)
    assert psutil.Process().memory_info().rss - rss < 50 * 1024 * 1024


def test_a_huge_gif_canvas_never_reaches_pillow(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[bool] = []
    original = GifImagePlugin.GifImageFile._open

    def spy(self: Any) -> None:
        opened.append(True)
        original(self)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", spy)
    assert_error(post(server, content=gif_screen(30000, 30000)), 422, "too_many_pixels")
    assert opened == []
