"""Faults: broken artifacts never become ready (and say why), a failing or NaN-producing or slow model fails only
the request at fault with a clean error, a client that goes away leaks nothing, bad settings fail start-up naming
the field. Fakes enter through create_app's loader port, never by patching privates."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.engine.embedding import Embedder, OnnxEmbedder
from app.engine.search import SearchEngine
from app.service.app import create_app
from app.service.config import Settings
from app.service.engines import load_engine
from app.service.lifecycle import EngineLoader
from app.service.state import AppState
from tests.helpers import DelegatingEmbedder, encode, live_server, make_tiny_model, product_image


class FaultyEmbedder(DelegatingEmbedder):
    """The real tiny model, with one fault switched on: raise, return NaN, or take `delay_s` per call."""

    def __init__(self, real: Embedder, fault: str, delay_s: float = 0.0) -> None:
        super().__init__(real)
        self.fault, self.delay_s = fault, delay_s
        self.calls_finished = 0

    def embed(self, batch: np.ndarray) -> np.ndarray:
        try:
            if self.fault == "raise":
                raise RuntimeError("onnxruntime: secret internal detail /opt/models/x")
            if self.fault == "slow":
                time.sleep(self.delay_s)
            out = self._real.embed(batch)
            if self.fault == "nan":
                out = np.full_like(out, np.nan)
            return out
        finally:
            self.calls_finished += 1


def faulty_loader(embedder: FaultyEmbedder) -> EngineLoader:
    def load(settings: Settings, _: Embedder | None = None) -> SearchEngine:
        return load_engine(settings, embedder)

    return load


TOKEN = "fault-test-admin-token"  # noqa: S105 - test credential


def _query() -> bytes:
    return encode(product_image("red-apple", 2))


def _settings(index: Path, model: Path, **kw: object) -> Settings:
    return Settings(index_dir=index, model_dir=model, warmup_queries=0, **kw)  # type: ignore[arg-type]


def _not_ready_because(settings: Settings, *needles: str) -> None:
    app = create_app(settings)
    with live_server(app) as base:
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert httpx.post(f"{base}/search", content=_query()).status_code == 503
        assert httpx.get(f"{base}/healthz").status_code == 200  # alive, so the orchestrator does not loop
    state: AppState = app.state.vps
    assert state.load_error is not None
    for needle in needles:
        assert needle in state.load_error, state.load_error


def test_missing_model_file(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.onnx").unlink()
    _not_ready_because(_settings(faiss_index, model), "model file missing", str(model / "model.onnx"))


def test_truncated_model_file(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    data = (model / "model.onnx").read_bytes()
    (model / "model.onnx").write_bytes(data[: len(data) // 2])
    _not_ready_because(_settings(faiss_index, model), "model.onnx", "sha256 expected")


def test_model_and_shard_dims_disagree(faiss_index: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "dim8", dim=8)
    _not_ready_because(_settings(faiss_index, other), "manifest.json")


def test_truncated_shard_file(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(faiss_index, index, copy_function=shutil.copyfile)  # writable copies: the test damages one
    version = (index / "CURRENT").read_text().strip()
    shard = sorted((index / version / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:100])
    _not_ready_because(_settings(index, tiny_model), shard.name)


def _corrupt_a_shard(faiss_index: Path, tmp_path: Path) -> tuple[Path, str, Callable[[], None]]:
    """A writable copy of the index with one shard's bytes flipped (same size); returns it, that category, and
    how to repair it."""
    index = tmp_path / "index"
    shutil.copytree(faiss_index, index, copy_function=shutil.copyfile)
    version = index / (index / "CURRENT").read_text().strip()
    entry = json.loads((version / "manifest.json").read_text())["categories"][0]
    shard = version / entry["shard"]
    good = shard.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return index, entry["name"], lambda: shard.write_bytes(good)


def test_a_shard_that_fails_its_hash_after_ready_is_never_searched(
    faiss_index: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """VPS_VERIFY_SHARDS=background: ready before the shards are hashed; the corrupt shard's searches answer 503
    shard_unavailable (its bytes never read), the other shards' answer, and /readyz turns 503 once the
    background pass has found it, so the replica leaves its load balancer."""
    index, category, repair = _corrupt_a_shard(faiss_index, tmp_path)
    app = create_app(_settings(index, tiny_model, verify_shards="background", admin_token=TOKEN))
    with live_server(app) as base:
        state: AppState = app.state.vps
        assert state.engine is not None and state.engine.pending is not None
        assert state.engine.pending.done.wait(30)
        r = httpx.post(f"{base}/search", params={"category": category}, content=_query())
        assert r.status_code == 503 and r.json()["error"]["code"] == "shard_unavailable", r.text
        assert "sha256" not in r.text  # the reason is logged, not sent
        other = next(c for c in state.engine.categories if c != category)
        assert httpx.post(f"{base}/search", params={"category": other}, content=_query()).status_code == 200
        # A batch whose images all route to it answers each with that error; the batch itself is answered.
        files = [("image", (f"{i}.jpg", _query(), "image/jpeg")) for i in range(2)]
        batch = httpx.post(f"{base}/v1/search/batch", params={"category": category}, files=files)
        assert batch.status_code == 200, batch.text
        assert [e["error"]["code"] for e in batch.json()["results"]] == ["shard_unavailable"] * 2
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert httpx.get(f"{base}/healthz").status_code == 200
        n = len(state.engine.categories)
        assert _shard_gauges(base) == {"verified": n - 1, "pending": 0, "refused": 1}  # what an alert reads
        # The file repaired, a reload of the same version swaps in a fully verified engine: ready again.
        repair()
        reload = httpx.post(f"{base}/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        assert reload.status_code == 200 and reload.json()["result"] == "success", reload.text
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert _shard_gauges(base) == {"verified": n, "pending": 0, "refused": 0}
        assert httpx.post(f"{base}/search", params={"category": category}, content=_query()).status_code == 200


def _shard_gauges(base: str) -> dict[str, int]:
    text = httpx.get(f"{base}/metrics").text
    found = re.findall(r'^vps_index_shards\{state="(\w+)"\} ([0-9.]+)$', text, re.MULTILINE)
    return {name: int(float(value)) for name, value in found}


def test_a_corrupt_shard_refuses_the_start_when_verified_first(
    faiss_index: Path, tiny_model: Path, tmp_path: Path
) -> None:
    index, _, _ = _corrupt_a_shard(faiss_index, tmp_path)
    _not_ready_because(_settings(index, tiny_model, verify_shards="before_ready"), "sha256 expected")


@pytest.mark.parametrize("fault", ["raise", "nan"])
def test_inference_error_or_nan_is_a_clean_500(faiss_index: Path, tiny_model: Path, fault: str) -> None:
    embedder = FaultyEmbedder(OnnxEmbedder(tiny_model), fault)
    with live_server(create_app(_settings(faiss_index, tiny_model), loader=faulty_loader(embedder))) as base:
        r = httpx.post(f"{base}/search", content=_query(), headers={"X-Request-ID": "fault-test-1"})
        assert r.status_code == 500
        assert r.json() == {
            "error": {"code": "internal_error", "message": r.json()["error"]["message"], "request_id": "fault-test-1"}
        }
        assert "secret" not in r.text and "NaN" not in r.text and "onnxruntime" not in r.text
        assert httpx.get(f"{base}/readyz").status_code == 200  # one failed request, not a failed service
        embedder.fault = "none"
        assert httpx.post(f"{base}/search", content=_query()).status_code == 200


def test_inference_slower_than_the_deadline_is_503_and_keeps_its_slot(faiss_index: Path, tiny_model: Path) -> None:
    embedder = FaultyEmbedder(OnnxEmbedder(tiny_model), "slow", delay_s=1.5)
    settings = _settings(faiss_index, tiny_model, request_timeout_s=0.3, max_inflight=1, pool_threads=1)
    app = create_app(settings, loader=faulty_loader(embedder))
    state: AppState = app.state.vps
    with live_server(app) as base:
        t0 = time.perf_counter()
        r = httpx.post(f"{base}/search", content=_query())
        waited = time.perf_counter() - t0
        assert r.status_code == 503 and r.json()["error"]["code"] == "deadline_exceeded" and r.headers["retry-after"]
        assert waited < 1.2  # answered at the deadline, not when the work ended
        # The abandoned work still runs: its slot stays taken, so the next request is refused, not queued.
        assert state.runner.inflight == 1
        assert httpx.post(f"{base}/search", content=_query()).json()["error"]["code"] == "overloaded"
        deadline = time.monotonic() + 10
        while state.runner.inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.runner.inflight == 0 and embedder.calls_finished >= 1
        embedder.fault = "none"
        assert httpx.post(f"{base}/search", content=_query()).status_code == 200


def test_client_disconnect_mid_upload_leaks_nothing(
    faiss_index: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # any temporary file the server made would land here
    app = create_app(_settings(faiss_index, tiny_model))
    state: AppState = app.state.vps
    body = encode(product_image("red-apple", 1))
    with live_server(app) as base:
        port = int(base.rsplit(":", 1)[1])
        for content_type, payload in [
            ("image/jpeg", body),
            ("multipart/form-data; boundary=XyZ", b'--XyZ\r\nContent-Disposition: form-data; name="image"; '
             b'filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + body),
        ]:  # fmt: skip
            with socket.create_connection(("127.0.0.1", port)) as s:
                head = f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                s.sendall(f"{head}Content-Length: {len(payload) + 5000}\r\n\r\n".encode() + payload[:-100])
                time.sleep(0.3)

        async def abandon() -> None:
            async with httpx.AsyncClient() as client:
                task = asyncio.create_task(client.post(f"{base}/search", content=body))
                await asyncio.sleep(0.01)
                task.cancel()

        asyncio.run(abandon())  # a client that goes away while its search runs
        deadline = time.monotonic() + 5
        text = ""
        while time.monotonic() < deadline:
            text = httpx.get(f"{base}/metrics").text
            if "vps_inflight_requests 0.0" in text and state.runner.inflight == 0:
                break
            time.sleep(0.05)
        assert "vps_inflight_requests 0.0" in text and state.runner.inflight == 0
        assert 'status="499"' in text  # counted as the client's doing, not a server error
        assert 'status="500"' not in text
        assert httpx.post(f"{base}/search", content=body).status_code == 200
    assert list(spool.iterdir()) == []


@pytest.mark.parametrize(
    ("env", "field"),
    [({"VPS_MAX_INFLIGHT": "abc"}, "max_inflight"), ({"VPS_POOL_THREADS": "0"}, "pool_threads"),
     ({"VPS_LOG_LEVEL": "LOUD"}, "log_level"), ({"VPS_DRAIN_S": "-1"}, "drain_s")],
)  # fmt: skip
def test_invalid_settings_fail_start_up_naming_the_field(env: dict[str, str], field: str) -> None:
    vps = str(Path(sys.executable).with_name("vps"))
    result = subprocess.run(
        [vps, "serve", "--port", "1"], env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert field in result.stderr and "Traceback" not in result.stderr


def test_settings_are_validated_when_the_app_is_built() -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        Settings(max_inflight=0)


def test_slow_uploads_do_not_hold_compute_slots(faiss_index: Path, tiny_model: Path) -> None:
    """A client trickling its body (slowloris) holds a connection, not one of the few admission slots."""
    with live_server(create_app(_settings(faiss_index, tiny_model, max_inflight=1, pool_threads=1))) as base:
        port = int(base.rsplit(":", 1)[1])
        body = _query()
        slow = []
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port))
            head = f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n"
            head += "\r\n"
            s.sendall(head.encode() + body[:100])
            slow.append(s)
        time.sleep(0.3)
        assert httpx.post(f"{base}/search", content=body).status_code == 200
        for s in slow:
            s.sendall(body[100:])
            assert s.recv(64).startswith(b"HTTP/1.1 200")
            s.close()
