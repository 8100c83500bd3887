"""POST /search runs on a plain ASGI lane ahead of FastAPI's router (app/service/app.py, ServiceApp). The lane must
answer exactly as the FastAPI route it bypasses would: the same statuses, error codes, headers and bodies, the same
metrics label and access-log line. Both are served over real HTTP side by side and compared request by request."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import encode, live_server, product_image

JPEG = encode(product_image("red-apple", 5), "JPEG")
# (what the request is, how it is sent): good searches and each kind of refusal the route maps.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("multipart", {"files": {"image": ("q.jpg", JPEG, "image/jpeg")}, "params": {"k": 3}}),
    ("raw body", {"content": JPEG, "headers": {"content-type": "image/jpeg"}, "params": {"explain": "true"}}),
    ("forced category", {"content": JPEG, "headers": {"content-type": "image/jpeg"}, "params": {"category": "milk"}}),
    ("bad k", {"content": JPEG, "headers": {"content-type": "image/jpeg"}, "params": {"k": 0}}),
    ("unknown parameter type", {"content": JPEG, "headers": {"content-type": "image/jpeg"}, "params": {"k": "x"}}),
    ("unknown category", {"content": JPEG, "headers": {"content-type": "image/jpeg"}, "params": {"category": "no"}}),
    ("empty body", {"content": b"", "headers": {"content-type": "image/jpeg"}}),
    ("not an image", {"content": b"hello" * 20, "headers": {"content-type": "image/jpeg"}}),
    ("too large", {"content": b"\xff" * 300_000, "headers": {"content-type": "image/jpeg"}}),
    ("multipart without image", {"files": {"other": ("q.jpg", JPEG, "image/jpeg")}}),
    ("broken multipart", {"content": b"--x\r\nnope", "headers": {"content-type": "multipart/form-data; boundary=x"}}),
]


@pytest.fixture(scope="module")
def servers(faiss_index: Path, tiny_model: Path) -> Iterator[tuple[str, str]]:
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=1, max_upload_bytes=200_000)
    with_lane, without = create_app(settings), create_app(settings)
    assert ("POST", "/search") in with_lane.lanes
    without.lanes.clear()  # every request takes FastAPI's router and Starlette's middleware stack
    with live_server(with_lane) as a, live_server(without) as b:
        yield a, b


def _comparable(r: httpx.Response) -> tuple[int, dict[str, str], Any]:
    body = r.json()
    if "timings_ms" in body:
        body["timings_ms"] = sorted(body["timings_ms"])  # the stages, not their times
    if "error" in body:
        assert body["error"]["request_id"] == r.headers["x-request-id"]
        body["error"]["request_id"] = "same"
    headers = {k: v for k, v in r.headers.items() if k not in ("date", "x-request-id", "content-length")}
    return r.status_code, headers, body


@pytest.mark.parametrize(("case", "request_kwargs"), CASES, ids=[c for c, _ in CASES])
def test_the_lane_answers_as_the_fastapi_route(servers: tuple[str, str], case: str, request_kwargs: Any) -> None:
    lane, fastapi = (httpx.post(f"{base}/search", **request_kwargs) for base in servers)
    assert _comparable(lane) == _comparable(fastapi), case
    assert lane.status_code < 500


def test_the_lane_is_counted_and_logged_under_its_route(
    servers: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    lane = servers[0]
    with caplog.at_level(logging.INFO, logger="app.access"):
        r = httpx.post(f"{lane}/search", content=JPEG, headers={"content-type": "image/jpeg", "x-request-id": "lane-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "lane-1"
    lines = [rec for rec in caplog.records if getattr(rec, "request_id", None) == "lane-1"]
    assert [(rec.route, rec.status, rec.method) for rec in lines] == [("/search", 200, "POST")]  # type: ignore[attr-defined]
    metrics = httpx.get(f"{lane}/metrics").text
    assert 'vps_requests_total{route="/search",status="200"}' in metrics
    assert json.loads(httpx.get(f"{lane}/openapi.json").text)["paths"]["/search"]["post"]  # still documented


@pytest.fixture(scope="module")
def guarded(faiss_index: Path, tiny_model: Path) -> Iterator[tuple[str, str]]:
    """A pair with VPS_ALLOWED_HOSTS set, and whose engine fails unexpectedly on one photo (through the loader
    port): the refusals that happen before the route and the last-resort 500."""
    from app.service.engines import load_engine

    def failing_loader(settings: Settings, embedder: Any = None) -> Any:
        engine = load_engine(settings, embedder)
        real = engine.search_image

        def search_image(data: bytes, *args: Any, **kwargs: Any) -> Any:
            if data == BOOM:
                raise RuntimeError("secret detail that must not leak")
            return real(data, *args, **kwargs)

        engine.search_image = search_image  # type: ignore[method-assign]
        return engine

    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, allowed_hosts=["127.0.0.1"])
    with_lane, without = create_app(settings, failing_loader), create_app(settings, failing_loader)
    without.lanes.clear()
    with live_server(with_lane) as a, live_server(without) as b:
        yield a, b


BOOM = encode(product_image("blue-milk", 3), "JPEG")


def test_a_refused_host_and_an_unexpected_error_look_the_same_on_both_paths(
    guarded: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    image = {"content-type": "image/jpeg"}
    with caplog.at_level(logging.INFO, logger="app.access"):
        for i, base in enumerate(guarded):
            refused = httpx.post(f"{base}/search", content=JPEG, headers={**image, "host": "evil.example"})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host"
            failed = httpx.post(f"{base}/search", content=BOOM, headers={**image, "x-request-id": f"boom-{i}"})
            assert failed.status_code == 500
            assert failed.json()["error"] == {
                "code": "internal_error",
                "message": "internal error",
                "request_id": f"boom-{i}",
            }
            assert "secret" not in failed.text
            metrics = httpx.get(f"{base}/metrics").text
            assert 'vps_requests_total{route="unmatched",status="400"} 1.0' in metrics  # not counted as /search
            assert 'vps_requests_total{route="/search",status="500"} 1.0' in metrics
    lines = [
        (r.route, r.status, getattr(r, "path", None))
        for r in caplog.records
        if r.name == "app.access" and r.route != "/metrics"
    ]  # type: ignore[attr-defined]
    lane_lines, fastapi_lines = lines[: len(lines) // 2], lines[len(lines) // 2 :]
    assert lane_lines == fastapi_lines == [("unmatched", 400, "/search"), ("/search", 500, None)]
