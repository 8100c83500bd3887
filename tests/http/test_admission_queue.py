"""The bounded wait for a compute slot (VPS_QUEUE_WAIT_S, VPS_MAX_QUEUED), over real HTTP with a gated engine
that holds searches in flight for as long as a test needs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import encode, gated_loader, live_server, product_image

QUERY = encode(product_image("red-apple", 11))


@contextmanager
def gated_server(index: Path, model: Path, gate: threading.Event, **overrides: object) -> Iterator[str]:
    settings = Settings(
        index_dir=index,
        model_dir=model,
        pool_threads=1,
        max_inflight=1,
        warmup_queries=0,
        shadow_sample=0,
        **overrides,  # type: ignore[arg-type]
    )
    with live_server(create_app(settings, loader=gated_loader(gate))) as base:
        yield base


async def _until(predicate: object, base: str, client: httpx.AsyncClient) -> None:
    """Poll the in-flight gauge until `predicate(text)` holds (bounded: 200 x 25 ms)."""
    for _ in range(200):
        text = (await client.get(f"{base}/metrics")).text
        if predicate(text):  # type: ignore[operator]
            return
        await asyncio.sleep(0.025)
    raise AssertionError("the server never reached the expected state")


def test_a_queued_request_is_served_when_a_slot_frees_and_the_queue_is_bounded(
    faiss_index: Path, tiny_model: Path
) -> None:
    gate = threading.Event()
    with gated_server(faiss_index, tiny_model, gate, queue_wait_s=30.0, max_queued=2) as base:

        async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], str]:
            async with httpx.AsyncClient(timeout=40) as client:
                held = asyncio.create_task(client.post(f"{base}/search", content=QUERY))
                await _until(lambda t: "vps_inflight_requests 1.0" in t, base, client)
                queued = [asyncio.create_task(client.post(f"{base}/search", content=QUERY)) for _ in range(2)]
                await asyncio.sleep(0.5)  # both reach the queue (nothing finishes while the gate is shut)
                # Slot and queue full: refused at once, before the body is read, with the JSON error.
                extra = [await client.post(f"{base}/search", content=QUERY) for _ in range(3)]
                gate.set()
                served = [await held, *[await q for q in queued]]
                return served, extra, (await client.get(f"{base}/metrics")).text

        served, refused, metrics = asyncio.run(scenario())
    assert [r.status_code for r in served] == [200, 200, 200]
    # The two that waited are observed, with waits of at least the 0.5 s the gate stayed shut.
    assert "vps_admission_wait_seconds_count 2.0" in metrics
    assert 'vps_admission_wait_seconds_bucket{le="0.25"} 0.0' in metrics
    for r in refused:
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"


def test_a_wait_longer_than_queue_wait_s_is_refused_and_then_nobody_waits(faiss_index: Path, tiny_model: Path) -> None:
    gate = threading.Event()
    with gated_server(faiss_index, tiny_model, gate, queue_wait_s=0.3, max_queued=1) as base:

        async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response, str]:
            async with httpx.AsyncClient(timeout=40) as client:
                held = asyncio.create_task(client.post(f"{base}/search", content=QUERY))
                await _until(lambda t: "vps_inflight_requests 1.0" in t, base, client)
                waited = await client.post(f"{base}/search", content=QUERY)  # waits 0.3 s, then refused
                # Right after a refusal the queue is closed for QUEUE_CALM_S, though its one place is free again.
                refused = await client.post(f"{base}/search", content=QUERY)
                gate.set()
                first = await held
                after = await client.post(f"{base}/search", content=QUERY)
                assert after.status_code == 200
                return first, waited, refused, (await client.get(f"{base}/metrics")).text

        first, waited, refused, metrics = asyncio.run(scenario())
    assert first.status_code == 200
    for r in (waited, refused):
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and "retry-after" in r.headers
    assert 'vps_rejected_total{reason="overloaded"} 2.0' in metrics
    assert "vps_inflight_requests 0.0" in metrics
