"""Shadow recall over real HTTP (uvicorn on 127.0.0.1, the tiny real ONNX model, real faiss shards): a sample of
searches is searched again with every shard probed in the sampler's own thread, and /metrics counts whether
routing lost the exhaustive top-1 or part of the top-k; a full queue drops, a failure counts, and neither touches
the request. The background thread is waited for by polling /metrics within a bound, never by sleeping."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.engine.embedding import Embedder
from app.engine.search import SearchEngine, SearchOutcome, SearchParams
from app.service.app import create_app
from app.service.config import Settings
from app.service.engines import load_engine
from app.service.lifecycle import EngineLoader
from app.service.logs import JsonFormatter
from app.service.shadow import compare
from app.service.state import AppState
from tests.helpers import encode, live_server, product_image

# One shard probed and no fill (each shard of the tiny index holds 2 SKUs, k=2): what routing misses stays missed.
ROUTED = {"k": 2, "probe_mass": 0.5, "max_probes": 1}
SHADOW = ("same", "top1_missed", "topk_missed")


def _query(sku: str) -> bytes:
    return encode(product_image(sku, 9))  # a variant the catalogue does not hold


def _settings(index: Path, model: Path, **overrides: object) -> Settings:
    return Settings(**{"index_dir": index, "model_dir": model, "warmup_queries": 0, "shadow_sample": 1.0, **overrides})  # type: ignore[arg-type]


def _value(text: str, sample: str) -> float:
    m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert m, f"{sample} not exported"
    return float(m.group(1))


def _shadow(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text
    counts = {o: _value(text, f'vps_routing_shadow_total{{outcome="{o}"}}') for o in SHADOW}
    counts["dropped"] = _value(text, "vps_routing_shadow_dropped_total")
    counts["errors"] = _value(text, "vps_routing_shadow_errors_total")
    return counts


def _wait_for(base: str, done: Callable[[dict[str, float]], bool], timeout_s: float = 20) -> dict[str, float]:
    """Poll /metrics until `done` holds (the shadow thread has caught up), at most `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = _shadow(base)
        if done(counts):
            return counts
        if time.monotonic() > deadline:
            raise AssertionError(f"shadow counts never got there: {counts}")
        time.sleep(0.02)


def _search(base: str, sku: str, **params: object) -> dict:  # type: ignore[type-arg]
    r = httpx.post(f"{base}/search", content=_query(sku), params={**ROUTED, **params}, timeout=30)
    assert r.status_code == 200, r.text
    body: dict = r.json()  # type: ignore[type-arg]
    return body


def _rebuilt(e: SearchEngine, cls: type[SearchEngine] = SearchEngine, **changes: object) -> SearchEngine:
    """The loaded engine's parts in another engine (another class, or one part replaced)."""
    parts: dict[str, object] = {
        "embedder": e.embedder,
        "router": e.router,
        "shards": e.shards,
        "items": e.items,
        "manifest": e.manifest,
        "max_image_pixels": e.max_image_pixels,
        "overfetch": e.overfetch,
        **changes,
    }
    return cls(**parts)  # type: ignore[arg-type]


def _loader(make: Callable[[SearchEngine], SearchEngine]) -> EngineLoader:
    """create_app's engine-loader port: the real engine, remade by `make`."""

    def load(settings: Settings, embedder: Embedder | None = None) -> SearchEngine:
        return make(load_engine(settings, embedder))

    return load


class WrongRouter:
    """Sends every query to one category with all the probability: routing certain and wrong."""

    def __init__(self, categories: list[str], dim: int, always: str) -> None:
        self._categories, self._dim = categories, dim
        self._probs = np.zeros(len(categories), dtype=np.float32)
        self._probs[categories.index(always)] = 1.0

    @property
    def categories(self) -> list[str]:
        return self._categories

    @property
    def dim(self) -> int:
        return self._dim

    def probabilities(self, query: np.ndarray) -> np.ndarray:
        return self._probs.copy()


def _exhaustive(params: SearchParams, engine: SearchEngine) -> bool:
    return params.probe_mass == 1.0 and params.max_probes == len(engine.shards)


class GatedShadowEngine(SearchEngine):
    """Its every-shard searches (the shadow's) signal `entered`, then wait for `gate`; routed searches do not."""

    entered = threading.Event()
    gate = threading.Event()

    def search_vector(self, vector: np.ndarray, params: SearchParams) -> SearchOutcome:
        if _exhaustive(params, self):
            self.entered.set()
            self.gate.wait(10)
        return super().search_vector(vector, params)


class FailingShadowEngine(SearchEngine):
    def search_vector(self, vector: np.ndarray, params: SearchParams) -> SearchOutcome:
        if _exhaustive(params, self):
            raise RuntimeError("shadow search exploded")
        return super().search_vector(vector, params)


def _state(app: object) -> AppState:
    state: AppState = app.state.vps  # type: ignore[attr-defined]
    return state


@pytest.mark.parametrize(
    ("routed", "exhaustive", "outcome"),
    [
        (["a", "b"], ["a", "b"], "same"),
        (["a", "b"], ["a"], "same"),
        (["a", "c", "b"], ["a", "b", "c"], "same"),  # order below the top may differ
        (["a", "b"], ["a", "c"], "same"),  # so may the rest of the list: filling k follows the router
        ([], [], "same"),  # nothing passed the threshold either way
        (["b", "a"], ["a", "b"], "top1_missed"),  # demoted
        (["b", "c"], ["a", "b"], "topk_missed"),  # hidden
        ([], ["a"], "topk_missed"),  # routing's best fell below the open-set threshold, the exhaustive one did not
    ],
)
def test_compare_defines_the_outcomes(routed: list[str], exhaustive: list[str], outcome: str) -> None:
    assert compare(routed, exhaustive) == outcome


def test_a_hidden_product_is_counted_as_topk_missed(faiss_index: Path, tiny_model: Path) -> None:
    """The router puts all its mass on milk: a red-apple photo gets milk SKUs (2 SKUs fill k=2, so nothing is added)
    while every shard has red-apple on top. The request is answered as routed; the shadow counts the miss."""

    def wrong(e: SearchEngine) -> SearchEngine:
        return _rebuilt(e, router=WrongRouter(e.categories, e.embedder.dim, "milk"))

    app = create_app(_settings(faiss_index, tiny_model), loader=_loader(wrong))
    with live_server(app) as base:
        body = _search(base, "red-apple")
        assert [p["category"] for p in body["routing"]["probed"]] == ["milk"] and body["routing"]["added"] == []
        assert body["results"][0]["sku"] != "red-apple"
        counts = _wait_for(base, lambda c: c["topk_missed"] >= 1)
        assert counts == {"same": 0, "top1_missed": 0, "topk_missed": 1, "dropped": 0, "errors": 0}
        assert _state(app).shadow.running
    assert not _state(app).shadow.running, "the shadow thread outlived the app"


def test_same_skips_top_score_and_no_match(faiss_index: Path, tiny_model: Path) -> None:
    app = create_app(_settings(faiss_index, tiny_model))
    with live_server(app) as base:
        # Not sampled: a forced category (nothing routed) and a routed search that covered every shard.
        _search(base, "blue-milk", category="milk")
        _search(base, "blue-milk", probe_mass=1.0, max_probes=3)
        # Routed to milk, the exhaustive top-2 are the two milks too.
        assert [r["sku"] for r in _search(base, "blue-milk")["results"]] == ["blue-milk", "white-milk"]
        # Routed to apple: [red-apple, green-apple]; every shard: [red-apple, orange-juice]: the same top-1.
        assert [r["sku"] for r in _search(base, "red-apple")["results"]] == ["red-apple", "green-apple"]
        # Nothing reaches min_score 1: answered match=false, no top score. Not sampled either: coming up short,
        # the search filled k from every other shard, so it already was exhaustive.
        body = _search(base, "yellow-juice", min_score=1.0)
        assert body["match"] is False and len(body["routing"]["probed"] + body["routing"]["added"]) == 3
        counts = _wait_for(base, lambda c: c["same"] + c["top1_missed"] + c["topk_missed"] >= 2)
        assert counts == {"same": 2, "top1_missed": 0, "topk_missed": 0, "dropped": 0, "errors": 0}
        text = httpx.get(f"{base}/metrics").text
        assert _value(text, "vps_top_score_count") == 4  # every search answered with results
        assert _value(text, 'vps_top_score_bucket{le="0.975"}') == 0  # the tiny model's top hits score ~1.0
        assert _value(text, "vps_open_set_no_match_total") == 1


def test_a_full_queue_drops_and_counts_without_slowing_requests(faiss_index: Path, tiny_model: Path) -> None:
    GatedShadowEngine.entered.clear()
    GatedShadowEngine.gate.clear()
    app = create_app(
        _settings(faiss_index, tiny_model, shadow_queue=1), loader=_loader(lambda e: _rebuilt(e, GatedShadowEngine))
    )
    with live_server(app) as base:
        try:
            _search(base, "blue-milk")
            assert GatedShadowEngine.entered.wait(10), "the shadow thread never took the first sample"
            # The shadow thread is held: one more sample waits in the queue (size 1), the next two are dropped,
            # and every request is still answered.
            for sku in ("white-milk", "red-apple", "green-apple"):
                assert _search(base, sku)["results"]
            assert _shadow(base)["dropped"] == 2
        finally:
            GatedShadowEngine.gate.set()
        counts = _wait_for(base, lambda c: c["same"] + c["top1_missed"] + c["topk_missed"] >= 2)
        assert counts["dropped"] == 2 and counts["errors"] == 0


def test_a_failing_shadow_is_counted_and_logged_once(
    faiss_index: Path, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(_settings(faiss_index, tiny_model), loader=_loader(lambda e: _rebuilt(e, FailingShadowEngine)))
    with caplog.at_level(logging.ERROR, logger="app.service.shadow"), live_server(app) as base:
        for sku in ("blue-milk", "red-apple", "yellow-juice"):
            assert _search(base, sku)["results"]
        counts = _wait_for(base, lambda c: c["errors"] >= 3)
        assert counts == {"same": 0, "top1_missed": 0, "topk_missed": 0, "dropped": 0, "errors": 3}
    records = [r for r in caplog.records if r.name == "app.service.shadow"]
    assert len(records) == 1
    line = json.loads(JsonFormatter().format(records[0]))  # what the service's log handler writes
    assert line["level"] == "ERROR" and "shadow search exploded" in line["exc"]


def test_sample_zero_starts_no_thread_and_counts_nothing(faiss_index: Path, tiny_model: Path) -> None:
    app = create_app(_settings(faiss_index, tiny_model, shadow_sample=0.0))
    with live_server(app) as base:
        assert not _state(app).shadow.running
        for sku in ("red-apple", "blue-milk"):
            _search(base, sku)
        assert _shadow(base) == {"same": 0, "top1_missed": 0, "topk_missed": 0, "dropped": 0, "errors": 0}
        assert _value(httpx.get(f"{base}/metrics").text, "vps_top_score_count") == 2


def test_no_shadow_search_once_a_shard_is_refused(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    """A replica with a refused shard (VPS_VERIFY_SHARDS=background) still answers searches that avoid it; their
    every-shard shadow would only fail on it, so none is queued and no shadow error is counted."""
    import shutil

    from app.artifacts.manifest import read_manifest, resolve_current
    from app.service.metrics import SHADOW_OUTCOMES, Metrics
    from app.service.shadow import ShadowSampler

    index = tmp_path / "index"
    shutil.copytree(faiss_index, index, copy_function=shutil.copyfile)
    version = resolve_current(index)
    shard = version / read_manifest(version).categories[0].shard  # "apple"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    engine = load_engine(Settings(index_dir=index, model_dir=tiny_model, verify_shards="background"))
    assert engine.pending is not None
    params = SearchParams(k=1, probe_mass=0.01, max_probes=1, fill_max_probes=0)
    with pytest.raises(Exception, match="shard"):
        engine.search_image(encode(product_image("red-apple", 1)), params)  # routes to the refused shard
    outcome = engine.search_image(encode(product_image("blue-milk", 1)), params)  # routes to milk only
    assert len(outcome.probes) == 1 and engine.pending.failure is not None
    metrics = Metrics()
    sampler = ShadowSampler(1.0, 8, metrics, seed=0)
    sampler.start()
    try:
        sampler.offer(engine, params, outcome)
        time.sleep(0.3)
    finally:
        sampler.stop()
    assert metrics.registry.get_sample_value("vps_routing_shadow_errors_total") == 0
    outcomes = [metrics.registry.get_sample_value("vps_routing_shadow_total", {"outcome": o}) for o in SHADOW_OUTCOMES]
    assert outcomes == [0] * len(SHADOW_OUTCOMES)  # skipped, not searched
