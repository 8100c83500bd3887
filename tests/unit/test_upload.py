"""The multipart reader keeps the image part byte for byte (its pieces are joined once, not grown in a bytearray:
app/service/http/upload.py), large parts and data that looks like a boundary included, and refuses what it
refused."""

from __future__ import annotations

import os

import pytest

from app.errors import InvalidMultipart, MissingImage
from app.service.http.upload import image_from_multipart

BOUNDARY = "b0undary-1234"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def _body(*parts: tuple[str, bytes]) -> bytes:
    out = b""
    for name, data in parts:
        out += f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="x.jpg"\r\n'.encode()
        out += b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


@pytest.mark.parametrize("size", [0, 1, 17, 65_536, 2_000_000])
def test_the_image_part_comes_back_exactly(size: int) -> None:
    data = os.urandom(size)
    assert image_from_multipart(CONTENT_TYPE, _body(("note", b"hello"), ("image", data))) == data


def test_data_that_looks_like_a_boundary_is_kept_whole() -> None:
    # Each "\r\n--b0und..." starts like the delimiter and breaks off: data, not a part's end.
    tricky = b"".join(b"\xff\xd8\r\n--" + BOUNDARY[: i % len(BOUNDARY)].encode() + b"\r" for i in range(500))
    assert image_from_multipart(CONTENT_TYPE, _body(("image", tricky))) == tricky


def test_the_last_image_part_wins_and_missing_or_broken_bodies_are_refused() -> None:
    assert image_from_multipart(CONTENT_TYPE, _body(("image", b"one"), ("image", b"two"))) == b"two"
    with pytest.raises(MissingImage):
        image_from_multipart(CONTENT_TYPE, _body(("other", b"x")))
    with pytest.raises(InvalidMultipart):
        image_from_multipart(CONTENT_TYPE, b"--" + BOUNDARY.encode() + b"\r\nno headers end")
    with pytest.raises(InvalidMultipart):
        image_from_multipart("multipart/form-data", _body(("image", b"x")))  # no boundary
