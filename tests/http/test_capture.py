"""Query capture over real HTTP: off by default; on, a sampled search's photo is stored re-encoded without its
EXIF (GPS) beside what the service answered, off the request path; the directory is held to its bytes and age."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.service.app import create_app
from app.service.capture import QueryCapture
from app.service.config import Settings
from app.service.metrics import Metrics
from tests.helpers import encode, live_server, product_image

GPS_IFD = 0x8825


def _photo_with_gps() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif.get_ifd(GPS_IFD)[2] = (59.0, 20.0, 10.0)  # GPSLatitude
    buf = io.BytesIO()
    product_image("blue-milk", 70).save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.fixture
def capturing(tmp_path: Path, faiss_index: Path, tiny_model: Path) -> Iterator[tuple[str, Path]]:
    captures = tmp_path / "captures"
    settings = Settings(
        index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, capture_sample=1.0, capture_dir=captures
    )
    with live_server(create_app(settings)) as base:
        yield base, captures


def _wait_for(directory: Path, pattern: str, n: int, timeout_s: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = sorted(directory.glob(pattern)) if directory.exists() else []
        if len(found) >= n:
            return found
        time.sleep(0.05)
    return sorted(directory.glob(pattern)) if directory.exists() else []


def test_a_captured_photo_keeps_the_answer_and_loses_its_exif(capturing: tuple[str, Path]) -> None:
    base, captures = capturing
    photo = _photo_with_gps()
    assert Image.open(io.BytesIO(photo)).getexif().get_ifd(GPS_IFD)  # the upload does carry a position
    r = httpx.post(f"{base}/search", files={"image": ("q.jpg", photo, "image/jpeg")}, params={"k": 2})
    assert r.status_code == 200
    (answer,) = _wait_for(captures, "*/*.json", 1)
    record = json.loads(answer.read_text())
    assert [x["sku"] for x in record["results"]] == [x["sku"] for x in r.json()["results"]]
    assert record["index_version"] == r.json()["index_version"] and record["query"] == {"k": 2}
    assert r.headers["x-request-id"] in answer.name
    stored = Image.open(answer.with_suffix(".jpg"))
    assert stored.format == "JPEG" and stored.size == (96, 80)
    assert not stored.getexif() and "exif" not in stored.info  # no GPS, no device, nothing of the original's
    metrics = httpx.get(f"{base}/metrics").text
    assert 'vps_captures_total{result="stored"} 1.0' in metrics


def test_capture_is_off_by_default_and_needs_a_directory(tmp_path: Path, faiss_index: Path, tiny_model: Path) -> None:
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, capture_dir=tmp_path / "c")
    with live_server(create_app(settings)) as base:
        r = httpx.post(f"{base}/search", files={"image": ("q.jpg", encode(product_image("red-apple", 3)), "x")})
        assert r.status_code == 200
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="capture_dir"):
        Settings(index_dir=faiss_index, model_dir=tiny_model, capture_sample=0.1)


def test_prune_holds_the_directory_to_its_bytes_and_age(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    day = directory / "20261201"
    day.mkdir(parents=True)
    now_ms = int(time.time() * 1000)
    old = day / f"{now_ms - 3 * 3600 * 1000}-old.jpg"
    old.write_bytes(b"o" * 10)
    names = [day / f"{now_ms - i}-r{i}.jpg" for i in (30, 20, 10)]  # oldest first
    for p in names:
        p.write_bytes(b"x" * 100)
    cap = QueryCapture(1.0, directory, 250, 3600, 4, Metrics())
    assert cap.prune() == 2  # the one past its age, then the oldest recent one until 200 <= 250 bytes
    assert not old.exists() and not names[0].exists() and names[1].exists() and names[2].exists()
