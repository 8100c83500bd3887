"""Micro-batching: concurrent searches share one inference call, a lone one never waits for the window, errors
reach every caller of the batch, and answers over real HTTP are the unbatched ones."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.engine.batching import MicroBatcher
from app.engine.embedding import Embedder, OnnxEmbedder
from app.engine.imaging import Collected
from app.engine.search import SearchOutcome, SearchParams
from app.errors import InternalError
from app.service.app import create_app
from app.service.config import Settings
from app.service.engines import load_engine
from app.service.state import AppState
from tests.helpers import SKUS, DelegatingEmbedder, GatedEngine, encode, gated_loader, live_server, product_image

LONG = 60.0  # a window no test may wait out: a thread still blocked after JOIN_S has waited for it
JOIN_S = 20.0


class CountingEmbedder(DelegatingEmbedder):
    """The real tiny model, recording the rows of every inference call; `fail` makes calls raise."""

    def __init__(self, real: Embedder) -> None:
        super().__init__(real)
        self.calls: list[int] = []
        self.fail = False
        self.delay_s = 0.0
        self.lock = threading.Lock()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(len(batch))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("inference failed")
        return self._real.embed(batch)


@pytest.fixture
def counting(tiny_model: Path) -> CountingEmbedder:
    return CountingEmbedder(OnnxEmbedder(tiny_model))


def _inputs(embedder: Embedder, n: int) -> list[np.ndarray]:
    skus = sorted(SKUS)
    return [embedder.preprocess(product_image(skus[i % len(skus)], i))[None] for i in range(n)]


def _run_all(batcher: MicroBatcher, inputs: list[np.ndarray]) -> list[np.ndarray | BaseException]:
    """Every input on its own thread: all announce first, then all embed."""
    announced = threading.Barrier(len(inputs))
    out: list[np.ndarray | BaseException] = [RuntimeError("not run")] * len(inputs)

    def one(i: int) -> None:
        try:
            with batcher.expect(1):
                announced.wait(JOIN_S)
                out[i] = batcher.embed(inputs[i])
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_S)
    assert not any(t.is_alive() for t in threads), "a caller waited for images that were not coming"
    return out


def test_concurrent_images_share_one_call_and_each_gets_its_own_row(counting: CountingEmbedder) -> None:
    inputs = _inputs(counting, 3)
    expected = [counting.embed(x) for x in inputs]
    counting.calls.clear()
    out = _run_all(MicroBatcher(counting, LONG, max_rows=8), inputs)
    assert counting.calls == [3]
    for got, want in zip(out, expected, strict=True):
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_batches_hold_at_most_max_rows(counting: CountingEmbedder) -> None:
    out = _run_all(MicroBatcher(counting, LONG, max_rows=2), _inputs(counting, 5))
    assert all(isinstance(o, np.ndarray) for o in out)
    assert sum(counting.calls) == 5 and max(counting.calls) <= 2


def test_a_lone_request_does_not_wait_for_the_window(counting: CountingEmbedder) -> None:
    batcher = MicroBatcher(counting, LONG, max_rows=8)
    (x,) = _inputs(counting, 1)
    out = _run_all(batcher, [x])  # would block for LONG if it waited
    assert isinstance(out[0], np.ndarray) and counting.calls == [1]
    assert isinstance(batcher.embed(x), np.ndarray)  # no announcement at all (the catalogue's writes)


def test_an_announced_image_that_never_comes_releases_the_leader(counting: CountingEmbedder) -> None:
    batcher = MicroBatcher(counting, LONG, max_rows=8)
    (x,) = _inputs(counting, 1)
    decoding, failed = threading.Event(), threading.Event()

    def bad_image() -> None:
        with pytest.raises(ValueError), batcher.expect(1):
            decoding.set()
            failed.wait(JOIN_S)
            raise ValueError("undecodable")

    other = threading.Thread(target=bad_image)
    other.start()
    decoding.wait(JOIN_S)
    result: list[np.ndarray] = []

    def lead() -> None:
        with batcher.expect(1):
            result.append(batcher.embed(x))  # leads a batch and waits for the other thread's image...

    leader = threading.Thread(target=lead)
    leader.start()
    leader.join(0.3)  # (time for the leader to reach its wait; were it late, it would not wait at all)
    failed.set()  # ...which fails to decode: the leader goes at once, not after LONG
    leader.join(JOIN_S)
    other.join(JOIN_S)
    assert not leader.is_alive() and len(result) == 1 and counting.calls == [1]


def test_an_inference_error_reaches_every_caller_of_the_batch(counting: CountingEmbedder) -> None:
    counting.fail = True
    out = _run_all(MicroBatcher(counting, LONG, max_rows=8), _inputs(counting, 3))
    assert counting.calls == [3]
    assert all(isinstance(o, InternalError) and isinstance(o.__cause__, RuntimeError) for o in out)
    assert len({id(o) for o in out}) == 3  # one exception per caller, not one shared across threads


def test_a_thread_never_waits_for_its_own_images(counting: CountingEmbedder) -> None:
    """Two images announced, one decoded: its embed must not wait for the other (the thread's own)."""
    batcher = MicroBatcher(counting, LONG, max_rows=8)
    (x,) = _inputs(counting, 1)
    result: list[np.ndarray] = []

    def one() -> None:
        with batcher.expect(2):
            result.append(batcher.embed(x))

    t = threading.Thread(target=one)
    t.start()
    t.join(JOIN_S)
    assert not t.is_alive() and len(result) == 1


def test_calls_of_several_images_go_straight_through(counting: CountingEmbedder) -> None:
    batcher = MicroBatcher(counting, LONG, max_rows=2)
    batch = np.concatenate(_inputs(counting, 5))
    with batcher.expect(5):
        out = batcher.embed(batch)
    assert out.shape == (5, counting.dim) and counting.calls == [5]


def test_the_setting_wraps_the_model(faiss_index: Path, tiny_model: Path) -> None:
    on = load_engine(Settings(index_dir=faiss_index, model_dir=tiny_model, micro_batch_window_ms=2))
    off = load_engine(Settings(index_dir=faiss_index, model_dir=tiny_model))
    assert isinstance(on.embedder, MicroBatcher) and isinstance(off.embedder, OnnxEmbedder)


class AnnouncedGatedEngine(GatedEngine):
    def search_image(self, data: bytes, params: SearchParams, warnings: Collected | None = None) -> SearchOutcome:
        assert isinstance(self.embedder, MicroBatcher)
        with self.embedder.expect(1):
            return super().search_image(data, params, warnings)


def test_batched_answers_over_http_are_the_unbatched_ones(
    faiss_index: Path, tiny_model: Path, counting: CountingEmbedder
) -> None:
    """4 requests held at a gate on 4 pool threads, each announced, then let go together: they meet at the
    batcher (announced before the gate: threads woken together still start one GIL switch interval apart)."""
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, pool_threads=4, warmup_queries=0)
    batcher = MicroBatcher(counting, 5.0, max_rows=8)
    gate = threading.Event()

    queries = [encode(product_image(sku, v)) for sku, v in (("red-apple", 1), ("blue-milk", 2), ("green-apple", 3))]
    queries.append(queries[0])
    with live_server(create_app(settings)) as base:
        want = [httpx.post(f"{base}/search?k=3", content=q).json()["results"] for q in queries]
    app = create_app(settings, loader=gated_loader(gate, embedder=batcher, engine=AnnouncedGatedEngine))
    with live_server(app) as base, ThreadPoolExecutor(4) as pool:
        sent = [pool.submit(httpx.post, f"{base}/search?k=3", content=q, timeout=30) for q in queries]
        state: AppState = app.state.vps
        deadline = time.monotonic() + JOIN_S
        while state.runner.inflight < len(queries) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()
        answers = [f.result() for f in sent]
    assert [a.status_code for a in answers] == [200] * len(queries)
    for a, w in zip(answers, want, strict=True):
        got = a.json()["results"]
        assert [r["sku"] for r in got] == [r["sku"] for r in w]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in w], atol=1e-4)
    assert sum(counting.calls) == len(queries) and max(counting.calls) >= 2
