"""Hostile inputs over real HTTP (issue 16, classes 1-3 and 7): decode bombs under the caps answered with a stable
4xx before their cost is paid, library warnings counted and logged once per request, and no response built from
the Host header."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.engine.imaging import install_warning_capture
from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import live_server
from tests.hostile import animated_webp, exif_warning_jpeg, scan_bomb, segment_bomb, sixteen_bit_png


@pytest.fixture(scope="module")
def server(faiss_index: Path, tiny_model: Path) -> Iterator[str]:
    with live_server(create_app(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0))) as base:
        yield base


def _metric(base: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", httpx.get(f"{base}/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.mark.parametrize(
    "make",
    [
        lambda: scan_bomb(repeats=300),
        lambda: segment_bomb(2000),
        lambda: sixteen_bit_png(6300, 6300),
        lambda: animated_webp(6300, 6300),
    ],
    ids=["repeated progressive scans", "2,000 JPEG segments", "16-bit PNG 6300x6300", "animated WebP canvas"],
)
def test_decode_bombs_are_refused_with_a_stable_code(server: str, make) -> None:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{server}/search", content=make(), timeout=30)
    assert r.status_code == 422, r.text[:300]
    assert r.json()["error"]["code"] == "image_too_complex"
    assert httpx.post(f"{server}/search", content=exif_warning_jpeg(1), timeout=30).status_code == 200


def test_library_warnings_are_counted_and_logged_once(server: str, caplog: pytest.LogCaptureFixture) -> None:
    install_warning_capture()  # as `vps serve` does at start; pytest swaps warnings.showwarning for every test
    before = _metric(server, "vps_library_warnings_total")
    with caplog.at_level(logging.WARNING):
        r = httpx.post(f"{server}/search", content=exif_warning_jpeg(5000), timeout=30)
    assert r.status_code == 200
    assert _metric(server, "vps_library_warnings_total") - before == 5000
    lines = [
        rec
        for rec in caplog.records
        if "Skipping tag" in rec.getMessage() or rec.getMessage().startswith("library warnings")
    ]
    assert len(lines) == 1
    line = lines[0]
    assert line.count == 5000 and line.request_id == r.headers["x-request-id"]  # type: ignore[attr-defined]
    assert len(str(line.first)) < 1000  # type: ignore[attr-defined]


def test_a_trailing_slash_never_redirects_to_the_host_header(server: str) -> None:
    r = httpx.get(f"{server}/healthz/", headers={"Host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found"
    assert "evil.example" not in r.text


def test_allowed_hosts_refuse_others_and_leave_probes_alone(faiss_index: Path, tiny_model: Path) -> None:
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, allowed_hosts=["shop.example"])
    with live_server(create_app(settings)) as base:
        r = httpx.get(f"{base}/v1/info", headers={"Host": "evil.example"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        assert httpx.get(f"{base}/v1/info", headers={"Host": "shop.example:8000"}).status_code == 200
        assert httpx.get(f"{base}/readyz", headers={"Host": "10.1.2.3:8000"}).status_code == 200
