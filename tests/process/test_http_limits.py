"""HTTP-layer limits of a real `vps serve` process, over raw sockets: request heads bounded in bytes, fields and
time (431 / 408, JSON, Connection: close, then closed), idle or half-sent heads never fail the probes, requests
beyond the cap get the JSON 503 with Retry-After while /healthz, /readyz and /metrics still answer, and a burst
of concurrent searches gets only 200s and JSON 503s."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import encode, product_image
from tests.process.test_serve_process import serve_process

QUERY = encode(product_image("blue-milk", 4))


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _read_answer(conn: socket.socket) -> dict[str, Any]:
    """One answer: status, headers, JSON body."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        assert chunk, f"closed without an answer: {buf!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = conn.recv(65536)
        assert chunk
        rest += chunk
    return {"status": int(lines[0].split()[1]), "headers": headers, "body": json.loads(rest[:length])}


def _closed(conn: socket.socket) -> bool:
    """Reads until the server closes the connection (the socket's timeout fails the test if it never does)."""
    try:
        while conn.recv(65536):
            pass  # anything after the answer is discarded
    except ConnectionResetError:
        pass
    return True


def _exchange(base: str, raw: bytes, timeout: float = 20.0) -> tuple[dict[str, Any], socket.socket]:
    conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=timeout)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.sendall(raw)  # refused while still sending: the answer is still there to read
    return _read_answer(conn), conn


def _assert_refused(answer: dict[str, Any], status: int, code: str) -> None:
    assert answer["status"] == status, answer
    assert answer["headers"]["content-type"] == "application/json"
    assert answer["headers"]["connection"] == "close"
    error = answer["body"]["error"]
    assert error["code"] == code and error["message"] and error["request_id"] == answer["headers"]["x-request-id"]


def _get(path: str, *headers: str) -> bytes:
    return ("\r\n".join([f"GET {path} HTTP/1.1", "Host: t", *headers]) + "\r\n\r\n").encode()


@contextmanager
def limited(faiss_index: Path, tiny_model: Path, *args: str, **env: str) -> Iterator[str]:
    with serve_process(faiss_index, tiny_model, *args, VPS_DRAIN_S="0", VPS_SHADOW_SAMPLE="0", **env) as (proc, base):
        yield base
        proc.send_signal(signal.SIGTERM)  # workers too: a killed supervisor would leave them running
        assert proc.wait(timeout=40) == 0


def test_head_bytes_and_fields_are_bounded(faiss_index: Path, tiny_model: Path) -> None:
    with limited(faiss_index, tiny_model, VPS_MAX_HEADER_BYTES="4096", VPS_MAX_HEADERS="20") as base:
        # Exactly at the byte limit (request line, headers and the blank line): answered; one byte more: 431.
        start = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Pad: "
        at_limit = start + b"p" * (4096 - len(start) - 4) + b"\r\n\r\n"
        assert len(at_limit) == 4096
        answer, conn = _exchange(base, at_limit)
        assert answer["status"] == 200
        conn.close()
        answer, conn = _exchange(base, at_limit.replace(b"X-Pad: ", b"X-Pad: q"))
        _assert_refused(answer, 431, "headers_too_large")
        assert _closed(conn)

        # 20 fields (Host included) answered; 21: 431.
        fields = [f"X-F{i}: v" for i in range(19)]
        answer, conn = _exchange(base, _get("/healthz", *fields))
        assert answer["status"] == 200
        conn.close()
        answer, conn = _exchange(base, _get("/healthz", *fields, "X-One-More: v"))
        _assert_refused(answer, 431, "too_many_headers")
        assert _closed(conn)

        # Hostile sizes: an 8 MB header value, 200,000 tiny headers, an 8 MB URL, a head spread over many
        # small writes: all refused, and the server still answers.
        for raw in (
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + b"X: y\r\n" * 200_000 + b"\r\n",
            b"GET /healthz?" + b"q" * (8 << 20) + b" HTTP/1.1\r\nHost: t\r\n\r\n",
        ):
            answer, conn = _exchange(base, raw)
            assert answer["status"] == 431
            conn.close()
        conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=20)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        for _ in range(400):
            conn.sendall(b"X-Trickle: " + b"t" * 20 + b"\r\n")  # 12.8 KB in 400 writes, more than 20 fields
        _assert_refused(_read_answer(conn), 431, "too_many_headers")
        conn.close()

        # Pipelined requests whose heads together exceed the limit: each head is counted on its own.
        conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=20)
        conn.sendall(_get("/healthz") * 300)  # 300 x 35 bytes in one write
        reader = conn.makefile("rb")
        for _ in range(300):
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200 "), status
            length = 0
            while (line := reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
        conn.close()

        # Invalid HTTP is a JSON 400 too.
        answer, conn = _exchange(base, b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n")
        _assert_refused(answer, 400, "invalid_http")
        conn.close()

        metrics = httpx.get(f"{base}/metrics").text
        assert 'vps_rejected_total{reason="headers_too_large"}' in metrics
        assert 'vps_rejected_total{reason="too_many_headers"}' in metrics
        assert httpx.post(f"{base}/search", content=QUERY).status_code == 200


def test_a_head_not_complete_in_time_is_answered_408_and_closed(faiss_index: Path, tiny_model: Path) -> None:
    with limited(faiss_index, tiny_model, VPS_HEAD_TIMEOUT_S="1") as base:
        # A partial head, then nothing.
        conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=20)
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        _assert_refused(_read_answer(conn), 408, "request_timeout")
        assert _closed(conn)

        # A head trickled a byte at a time, each byte in time but not the whole head.
        conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=20)
        head, sent = _get("/healthz", *[f"X-F{i}: v" for i in range(10)]), 0
        try:
            for byte in head:
                conn.sendall(bytes([byte]))
                sent += 1
                conn.settimeout(0.1)
                try:
                    if conn.recv(65536, socket.MSG_PEEK):
                        break  # the server answered before the head was complete
                except TimeoutError:
                    pass
        except (BrokenPipeError, ConnectionResetError):
            pass
        conn.settimeout(20)
        _assert_refused(_read_answer(conn), 408, "request_timeout")
        conn.close()
        assert sent < len(head)

        # A connection that sends nothing is closed without an answer.
        conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=20)
        assert conn.recv(65536) == b""
        conn.close()

        # On a keep-alive connection: the second request's head is timed from its first byte.
        conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=20)
        conn.sendall(_get("/healthz"))
        assert _read_answer(conn)["status"] == 200
        conn.sendall(b"GET /readyz HTTP/1.1\r\n")
        _assert_refused(_read_answer(conn), 408, "request_timeout")
        conn.close()
        assert 'vps_rejected_total{reason="request_timeout"}' in httpx.get(f"{base}/metrics").text


def test_idle_heads_and_a_full_request_cap_never_fail_the_probes(faiss_index: Path, tiny_model: Path) -> None:
    with limited(faiss_index, tiny_model, VPS_MAX_CONNECTIONS="8", VPS_HEAD_TIMEOUT_S="60") as base:
        port = _port(base)
        # 60 connections that send part of a head and then nothing (7.5x the cap): they hold no request.
        idle = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(60)]
        for conn in idle:
            conn.sendall(b"POST /search HTTP/1.1\r\nHost: t\r\nContent-Type: ima")
        with httpx.Client(timeout=10) as client:
            for path in ("/healthz", "/readyz", "/metrics"):
                assert client.get(f"{base}{path}").status_code == 200
            assert client.post(f"{base}/search", content=QUERY).status_code == 200

            # 8 uploads in progress (each head answered "100 Continue", so the app is reading its body, then half
            # the body sent): the cap is full.
            uploads = []
            for _ in range(8):
                conn = socket.create_connection(("127.0.0.1", port), timeout=20)
                conn.sendall(
                    f"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: {len(QUERY)}\r\n"
                    "Expect: 100-continue\r\n\r\n".encode()
                )
                assert conn.recv(65536).startswith(b"HTTP/1.1 100 ")
                conn.sendall(QUERY[: len(QUERY) // 2])
                uploads.append(conn)
            r = client.post(f"{base}/search", content=QUERY)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert r.headers["retry-after"] == "1" and r.headers["content-type"] == "application/json"
            for path in ("/healthz", "/readyz", "/metrics"):
                assert client.get(f"{base}{path}").status_code == 200, path

            for conn in uploads:  # the uploads finish and are answered
                conn.sendall(QUERY[len(QUERY) // 2 :])
                assert _read_answer(conn)["status"] == 200
                conn.close()
            assert client.post(f"{base}/search", content=QUERY).status_code == 200
        for conn in idle:
            conn.close()


def test_a_burst_gets_only_answers_and_json_refusals(faiss_index: Path, tiny_model: Path) -> None:
    n = 300
    with limited(faiss_index, tiny_model, VPS_MAX_CONNECTIONS="64") as base:
        port = _port(base)
        raw = f"POST /search HTTP/1.1\r\nHost: t\r\nContent-Length: {len(QUERY)}\r\n\r\n".encode() + QUERY

        async def one() -> tuple[int, dict[str, str], bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(raw)
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
                body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 60)
                return int(lines[0].split()[1]), headers, body
            finally:
                writer.close()

        async def burst() -> list[tuple[int, dict[str, str], bytes]]:
            return await asyncio.gather(*(one() for _ in range(n)))

        answers = asyncio.run(burst())
        metrics = httpx.get(f"{base}/metrics").text
    served = [a for a in answers if a[0] == 200]
    refused = [a for a in answers if a[0] != 200]
    for status, headers, body in refused:
        assert status == 503 and headers["content-type"] == "application/json", (status, body[:200])
        assert json.loads(body)["error"]["code"] == "overloaded" and headers["retry-after"] == "1"
    assert len(served) > n // 100, f"{len(served)} of {n} served"
    assert len(served) + len(refused) == n
    assert 'vps_rejected_total{reason="overloaded"}' in metrics


def test_every_worker_applies_the_limits(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    with limited(
        faiss_index,
        tiny_model,
        "--workers",
        "2",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        VPS_MAX_HEADERS="10",
        VPS_HEAD_TIMEOUT_S="1",
    ) as base:
        for _ in range(8):  # new connections: the kernel spreads them over both workers
            answer, conn = _exchange(base, _get("/healthz", *[f"X-F{i}: v" for i in range(10)]))
            _assert_refused(answer, 431, "too_many_headers")
            conn.close()
        idle = [socket.create_connection(("127.0.0.1", _port(base)), timeout=20) for _ in range(8)]
        for conn in idle:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        assert httpx.get(f"{base}/healthz", headers={"Connection": "close"}).status_code == 200
        for conn in idle:
            _assert_refused(_read_answer(conn), 408, "request_timeout")
            conn.close()


def test_bytes_between_messages_do_not_hold_a_connection(faiss_index: Path, tiny_model: Path) -> None:
    """After a complete exchange, CRLFs keep arriving and no new request begins: the head timer runs from them."""
    with limited(faiss_index, tiny_model, VPS_HEAD_TIMEOUT_S="1") as base:
        answer, conn = _exchange(base, _get("/healthz"), timeout=10)
        assert answer["status"] == 200
        t0 = time.monotonic()
        closed = False
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(20):  # at most 10 s of drip
                conn.sendall(b"\r\n")
                time.sleep(0.5)
        conn.settimeout(10)
        with contextlib.suppress(OSError, AssertionError):
            closed = _closed(conn)
        assert closed and time.monotonic() - t0 < 8


def test_a_chunked_body_cannot_smuggle_a_huge_trailer(faiss_index: Path, tiny_model: Path) -> None:
    """Trailers are parsed after the head, so the head limits do not see them: the body's own bound does."""
    with limited(faiss_index, tiny_model, VPS_MAX_UPLOAD_BYTES="65536") as base:
        head = b"POST /search HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n"
        trailer = b"X-Pad: " + b"a" * (4 * 1024 * 1024) + b"\r\n\r\n"
        conn = socket.create_connection(("127.0.0.1", _port(base)), timeout=10)
        t0 = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.sendall(head + trailer)
        # The request is under way (its app waits for the body): no answer can be put in its middle, so the
        # connection is cut, as uvicorn cuts a broken body, long before the 4 MB are parsed.
        assert _closed(conn) and time.monotonic() - t0 < 5
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
