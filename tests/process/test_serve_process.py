"""`vps serve` as a real process: SIGTERM drains (readiness 503 at once, requests in flight finish, exit 0), and
several workers share one index and aggregate their metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.helpers import encode, free_port, product_image

VPS = str(Path(sys.executable).with_name("vps"))


@contextmanager
def serve_process(
    index_dir: Path, model_dir: Path, *args: str, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    full_env = {
        **os.environ,
        "VPS_INDEX_DIR": str(index_dir),
        "VPS_MODEL_DIR": str(model_dir),
        "VPS_WARMUP_QUERIES": "0",
        "VPS_LOG_LEVEL": "WARNING",
        **env,
    }
    proc = subprocess.Popen(
        [VPS, "serve", "--port", str(port), *args], env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"vps serve exited {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.1)
        else:
            raise AssertionError("vps serve did not become ready")
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _query() -> bytes:
    return encode(product_image("green-apple", 5))


def test_sigterm_drains_then_exits_0_and_no_request_fails(faiss_index: Path, tiny_model: Path) -> None:
    body = _query()
    with serve_process(faiss_index, tiny_model, VPS_DRAIN_S="1.5", VPS_MAX_INFLIGHT="16") as (proc, base):
        port = int(base.rsplit(":", 1)[1])
        # A request in flight across the signal: headers and half the body now, the rest after SIGTERM.
        slow = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = f"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: {len(body)}\r\n\r\n"
        slow.sendall(head.encode() + body[: len(body) // 2])

        # Steady load from other clients through the whole shutdown.
        outcomes: list[str] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    try:
                        r = client.post(f"{base}/search", content=body)
                        outcomes.append(str(r.status_code))
                    except httpx.ConnectError:
                        outcomes.append("refused")  # listener closed: nothing was sent, a client retries elsewhere
                        time.sleep(0.05)
                    except httpx.TransportError as exc:
                        outcomes.append(f"broken: {type(exc).__name__}")

        workers = [threading.Thread(target=load) for _ in range(2)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "not_ready"
        assert httpx.post(f"{base}/search", content=body, timeout=10).status_code == 200  # still serving
        # The load stops sending once readiness has failed, as a load balancer does; its requests in flight
        # finish. (Traffic still arriving when the listener closes can meet uvicorn closing a connection it
        # accepted but had not read yet: a request the server never started, reported as a ReadError.)
        stop.set()
        for w in workers:
            w.join()

        slow.sendall(body[len(body) // 2 :])
        response = b""
        while chunk := slow.recv(65536):
            response += chunk
        slow.close()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]

        assert proc.wait(timeout=40) == 0, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
    broken = [o for o in outcomes if o not in ("200", "refused")]
    assert outcomes.count("200") > 10 and not broken, broken


def test_workers_share_the_index_and_aggregate_metrics(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"stale from an earlier run")
    with serve_process(
        faiss_index,
        tiny_model,
        "--workers",
        "2",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        VPS_DRAIN_S="0",
        VPS_SHADOW_SAMPLE="1",  # every search's shadow, counted by each worker's own shadow thread
    ) as (proc, base):
        assert not (metrics_dir / "counter_999999.db").exists()
        # Both workers up (each writes its live gauges when its index is loaded).
        deadline = time.monotonic() + 30
        while len(_worker_pids(metrics_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(_worker_pids(metrics_dir)) == 2

        n = 24
        routed = {"k": 2, "probe_mass": 0.5, "max_probes": 1}  # one shard of three: not exhaustive, so shadowed
        for _ in range(n):  # a new connection each time, so the kernel spreads them over the workers
            r = httpx.post(f"{base}/search", content=_query(), params=routed, headers={"Connection": "close"})
            assert r.status_code == 200
        counts = set()
        for _ in range(6):  # whichever worker answers the scrape, it reports all workers' requests
            text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}).text
            counts.add(_sample(text, 'vps_requests_total{route="/search",status="200"}'))
            assert _sample(text, "vps_index_items") == 18  # one index, not summed per worker
            assert _sample(text, "vps_inflight_requests") == 0
            assert _sample(text, "vps_top_score_count") == n
        assert counts == {float(n)}
        deadline = time.monotonic() + 30  # the shadow threads catch up in the background: poll, bounded
        outcomes = ("same", "top1_missed", "topk_missed")
        while True:
            text = httpx.get(f"{base}/metrics", headers={"Connection": "close"}).text
            shadowed = sum(_sample(text, f'vps_routing_shadow_total{{outcome="{o}"}}') for o in outcomes)
            if shadowed + _sample(text, "vps_routing_shadow_dropped_total") == n or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert shadowed + _sample(text, "vps_routing_shadow_dropped_total") == n
        assert _sample(text, "vps_routing_shadow_errors_total") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    assert _worker_pids(metrics_dir) == set(), "exited workers must not count in live gauges"


def _worker_pids(metrics_dir: Path) -> set[str]:
    return {p.stem.rsplit("_", 1)[1] for p in metrics_dir.glob("gauge_live*_*.db")}


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")
