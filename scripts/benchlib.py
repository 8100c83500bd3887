"""Small pieces the benchmark scripts share (imported as `benchlib`: scripts run with scripts/ on sys.path)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

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


def start_server(args: list[str], env: dict[str, str], timeout_s: float = 120) -> tuple[subprocess.Popen[bytes], str]:
    """Start `vps serve <args>` on a free port and wait until /readyz answers 200; returns (process, base URL)."""
    port = free_port()
    vps = str(Path(sys.executable).with_name("vps"))
    server = subprocess.Popen([vps, "serve", "--port", str(port), *args], env=env, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return server, base
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"vps serve exited with {server.returncode}")
        time.sleep(0.2)
    server.kill()
    raise SystemExit("vps serve did not become ready")
