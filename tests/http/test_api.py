"""The app over real HTTP (uvicorn on 127.0.0.1) with a tiny real ONNX model and real faiss/hnswlib shards."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import SKUS, encode, gated_loader, live_server, product_image


@pytest.fixture(scope="module", params=["faiss", "hnswlib"])
def server(request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[str]:
    index = request.getfixturevalue(f"{request.param}_index")
    # Closed-set retrieval checks: the open-set thresholds are tested on their own below.
    settings = Settings(
        index_dir=index, model_dir=tiny_model, warmup_queries=1, max_upload_bytes=200_000, open_set=False
    )
    with live_server(create_app(settings)) as base:
        yield base


def _query(sku: str) -> bytes:
    return encode(product_image(sku, 99), "JPEG")  # a variant the catalogue does not hold


@pytest.mark.parametrize("sku", list(SKUS))
def test_search_finds_the_sku_multipart(server: str, sku: str) -> None:
    r = httpx.post(f"{server}/search", files={"image": ("q.jpg", _query(sku), "image/jpeg")}, params={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["sku"] == sku
    assert body["results"][0]["category"] == SKUS[sku][0]
    assert len({x["sku"] for x in body["results"]}) == len(body["results"]) <= 3
    assert body["routing"]["probed"] and not body["routing"]["forced"]
    assert set(body["timings_ms"]) == {"decode", "embed", "route", "search", "group", "total"}
    assert body["model"]["name"] == "tiny" and body["index_version"]
    assert r.headers["x-request-id"]


def test_raw_body_and_forced_category(server: str) -> None:
    r = httpx.post(
        f"{server}/search",
        content=encode(product_image("blue-milk", 7), "PNG"),
        headers={"content-type": "image/png"},
        params={"category": "milk", "k": 10, "explain": "true"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["routing"] == {
        "probed": [{"category": "milk", "probability": 1.0}],
        "added": [],
        "forced": True,
        "live": [],
    }
    assert {x["sku"] for x in body["results"]} == {"blue-milk", "white-milk"}
    assert len(body["hits"]) == 6  # explain: the image-level hits before grouping


def test_open_set_answers_no_match_and_min_score_overrides(faiss_index: Path, tiny_model: Path) -> None:
    """A photo of no catalogue product falls below the calibrated thresholds: match=false, no results; a known
    product still matches; an explicit min_score replaces the thresholds."""
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, open_set=True)
    rng = np.random.default_rng(3)
    unknown = encode(Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)), "PNG")
    with live_server(create_app(settings)) as base:
        r = httpx.post(f"{base}/search", content=unknown)
        assert r.status_code == 200 and r.json()["match"] is False and r.json()["results"] == []
        r = httpx.post(f"{base}/search", content=unknown, params={"min_score": -1})
        assert r.json()["match"] is True and r.json()["results"]
        info = httpx.get(f"{base}/v1/info").json()
        top = r.json()["results"][0]
        assert top["score"] < info["index"]["thresholds"][top["category"]]
        r = httpx.post(f"{base}/search", content=_query("blue-milk"))
        assert r.json()["match"] is True and r.json()["results"][0]["sku"] == "blue-milk"


def test_png_labelled_as_jpeg_is_accepted(server: str) -> None:
    r = httpx.post(
        f"{server}/search", files={"image": ("q.jpg", encode(product_image("red-apple", 3), "PNG"), "image/jpeg")}
    )
    assert r.status_code == 200 and r.json()["results"][0]["sku"] == "red-apple"


def test_min_score_filters(server: str) -> None:
    r = httpx.post(f"{server}/search", content=_query("red-apple"), params={"min_score": 1.0})
    assert r.status_code == 200 and r.json()["results"] == []


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"content": b""}, 400, "empty_body"),
        ({"content": b"<html></html>", "headers": {"content-type": "text/html"}}, 415, "unsupported_format"),
        ({"content": encode(product_image("red-apple", 0), "BMP")}, 415, "unsupported_format"),
        ({"content": encode(product_image("red-apple", 0))[:300]}, 400, "corrupt_image"),
        ({"files": {"photo": ("q.jpg", b"x", "image/jpeg")}}, 400, "missing_image"),
        ({"content": b"\xff\xd8\xff" + b"\0" * 200_000}, 413, "image_too_large"),
        ({"content": _query("red-apple"), "params": {"k": 0}}, 422, "invalid_parameter"),
        ({"content": _query("red-apple"), "params": {"k": 101}}, 422, "invalid_parameter"),
        ({"content": _query("red-apple"), "params": {"k": "abc"}}, 422, "invalid_parameter"),
        ({"content": _query("red-apple"), "params": {"min_score": "nan"}}, 422, "invalid_parameter"),
        ({"content": _query("red-apple"), "params": {"category": "bicycles"}}, 422, "unknown_category"),
        (
            {"content": b"--b\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=b"}},
            400,
            None,
        ),
    ],
)
def test_bad_input_is_a_clear_4xx(server: str, kwargs: dict, status: int, code: str | None) -> None:  # type: ignore[type-arg]
    r = httpx.post(f"{server}/search", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code
    assert err["message"] and err["request_id"] == r.headers["x-request-id"]
    assert "Traceback" not in r.text


def test_oversized_body_without_content_length_is_413(server: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"\xff\xd8\xff"
        for _ in range(100):
            yield b"\0" * 8192

    r = httpx.post(f"{server}/search", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"


def test_health_ready_info_metrics(server: str) -> None:
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json() == {"status": "ready"}
    info = httpx.get(f"{server}/v1/info").json()
    assert info["categories"] == ["apple", "juice", "milk"]
    assert info["index"]["n_items"] == 18 and info["model"]["output"]["dim"] == 16
    httpx.post(f"{server}/search", content=_query("red-apple"))
    text = httpx.get(f"{server}/metrics").text
    for name in (
        'vps_requests_total{route="/search",status="200"}',
        "vps_request_duration_seconds_bucket",
        'vps_stage_duration_seconds_count{stage="embed"}',
        "vps_inflight_requests 0.0",
        "vps_router_top_probability_count",
        "vps_shards_probed_count",
        "vps_index_items 18.0",
        "vps_build_info{",
        'vps_index_reloads_total{result="success"} 1.0',
    ):
        assert name in text, name


def test_unknown_route_is_json_404(server: str) -> None:
    r = httpx.get(f"{server}/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_not_ready_when_the_index_is_corrupt(tmp_path: Path, tiny_model: Path) -> None:
    settings = Settings(index_dir=tmp_path / "no-index", model_dir=tiny_model)
    with live_server(create_app(settings)) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]
        r = httpx.post(f"{base}/search", content=_query("red-apple"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert 'vps_index_reloads_total{result="failed"} 1.0' in httpx.get(f"{base}/metrics").text


def test_overload_is_rejected_at_once_with_retry_after(faiss_index: Path, tiny_model: Path) -> None:
    """With one admission slot held by a slow request and no queue, the next request is refused immediately
    (the bounded queue: tests/http/test_admission_queue.py)."""
    settings = Settings(
        index_dir=faiss_index,
        model_dir=tiny_model,
        max_inflight=1,
        max_queued=0,
        pool_threads=1,
        retry_after_s=2,
        warmup_queries=0,
        open_set=False,
    )
    gate = threading.Event()
    with live_server(create_app(settings, loader=gated_loader(gate))) as base:

        async def scenario() -> tuple[httpx.Response, httpx.Response, float]:
            async with httpx.AsyncClient(timeout=20) as client:
                first = asyncio.create_task(client.post(f"{base}/search", content=_query("red-apple")))
                await asyncio.sleep(0.3)
                t0 = time.perf_counter()
                second = await client.post(f"{base}/search", content=_query("red-apple"))
                waited = time.perf_counter() - t0
                gate.set()
                return await first, second, waited

        first, second, waited = asyncio.run(scenario())
        assert first.status_code == 200
        assert second.status_code == 503 and second.headers["retry-after"] == "2"
        assert second.json()["error"]["code"] == "overloaded"
        assert waited < 5  # refused while the first request was still held, not queued behind it
        assert 'vps_rejected_total{reason="overloaded"} 1.0' in httpx.get(f"{base}/metrics").text


def test_openapi_documents_the_search_contract(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json").json()
    search = spec["paths"]["/search"]["post"]
    assert set(search["requestBody"]["content"]) == {
        "multipart/form-data",
        *(f"image/{t}" for t in ("jpeg", "png", "webp", "heic", "heif", "avif", "gif")),
    }
    assert {p["name"] for p in search["parameters"]} == {
        "k",
        "category",
        "min_score",
        "probe_mass",
        "max_probes",
        "explain",
        "filter",
        "offset",
        "bbox",
        "bbox_units",
    }
    assert {"200", "400", "413", "415", "422", "503"} <= set(search["responses"])
    assert "match" in spec["components"]["schemas"]["SearchResponse"]["properties"]
