"""Small pieces the benchmark scripts share (imported as `benchlib`: scripts run with scripts/ on sys.path)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def encode_search(host: str, image: bytes, query: str = "") -> bytes:
    """A complete POST /search request (multipart field `image`), encoded once so that sending it costs the
    load generator almost nothing."""
    boundary = "vpsbenchboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /search{query} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_response(conn: socket.socket) -> int:
    """Read one HTTP/1.1 response with a Content-Length from `conn`; returns its status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:"))
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        rest += chunk
    return int(lines[0].split(" ", 2)[1])


def keepalive_caller(port: int, encoded: dict[int, bytes]) -> Callable[[bytes], None]:
    """A lean keep-alive client, one connection per calling thread, sending pre-encoded requests (`encoded` maps
    id(payload) to its request): what is measured is the service, not an HTTP client's CPU on the same cores
    (httpx spent ~1 ms a request here). Raises on any status but 200."""
    local = threading.local()

    def call(data: bytes) -> None:
        conn = getattr(local, "conn", None)
        try:
            if conn is None:
                raise ConnectionError("no connection yet")
            conn.sendall(encoded[id(data)])
            status = read_response(conn)
        except (ConnectionError, OSError):  # none yet, or an idle keep-alive the server closed: reconnect
            if conn is not None:
                conn.close()
            conn = local.conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(encoded[id(data)])
            status = read_response(conn)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")

    return call


def start_server(
    args: list[str],
    env: dict[str, str],
    timeout_s: float = 120,
    *,
    vps: str | None = None,
    log: IO[bytes] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Start `vps serve <args>` (this venv's, or `vps`) on a free port and wait until /readyz answers 200; returns
    (process, base URL). Its output goes to `log`, or nowhere."""
    port = free_port()
    vps = vps or str(Path(sys.executable).with_name("vps"))
    out = log if log is not None else subprocess.DEVNULL
    server = subprocess.Popen([vps, "serve", "--port", str(port), *args], env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    wait_ready(server, base, timeout_s, "vps serve")
    return server, base


def wait_ready(server: subprocess.Popen[bytes], base: str, timeout_s: float = 120, what: str = "the server") -> None:
    """Wait until `base`/readyz answers 200; a server that exits or stays unready ends the run with one line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"{what} exited with {server.returncode}")
        time.sleep(0.2)
    server.kill()
    raise SystemExit(f"{what} did not become ready")


def synthetic_index(
    out: Path, model_dir: Path, items: int, categories: int, seed: int = 0, *, M: int = 16, ef_construction: int = 80
) -> Path:
    """A published index (the service's format, built by the service's own code) of synthetic unit vectors for
    the model's dimension: `items` vectors in `categories` categories, 5 per SKU, with 1,000 calibration queries.
    Built once: a later call returns the CURRENT version."""
    import numpy as np

    from app.artifacts.manifest import resolve_current
    from app.engine.embedding import OnnxEmbedder
    from app.offline.build.build_index import BuildOptions, publish_vectors
    from app.offline.datasets.catalogue import CatalogueRow

    if (out / "CURRENT").exists():
        return resolve_current(out)
    embedder = OnnxEmbedder(model_dir)
    rng = np.random.default_rng(seed)
    dim = embedder.dim
    n_skus = items // 5
    cat_centres = rng.normal(size=(categories, dim))
    sku_cat = rng.integers(0, categories, size=n_skus)
    sku_centres = cat_centres[sku_cat] + 0.8 * rng.normal(size=(n_skus, dim))
    sku_of = np.repeat(np.arange(n_skus), 5)[:items]
    vectors = sku_centres[sku_of] + 0.5 * rng.normal(size=(items, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    rows = [
        CatalogueRow(line=i + 2, sku=f"sku-{s:06d}", category=f"cat-{sku_cat[s]:03d}", image=f"synthetic/{i}.jpg")
        for i, s in enumerate(sku_of)
    ]
    # Calibration queries: fresh photos of random SKUs (their centre plus new noise).
    q_sku = rng.integers(0, n_skus, size=1000)
    q = sku_centres[q_sku] + 0.5 * rng.normal(size=(len(q_sku), dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    q_rows = [
        CatalogueRow(line=i + 2, sku=f"sku-{s:06d}", category=f"cat-{sku_cat[s]:03d}", image=f"query/{i}.jpg")
        for i, s in enumerate(q_sku)
    ]
    options = BuildOptions(M=M, ef_construction=ef_construction, progress=True)
    return publish_vectors(vectors, rows, out, embedder, options, calibration=(q, q_rows)).version_dir


def write_report(out: Path, name: str, tag: str, command: str, results: list[Any], markdown: str) -> None:
    """<out>/<name>[-<tag>].json ({"command", "results"}) and .md beside it."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{tag}" if tag else name
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
