"""Small pieces the benchmark scripts share (imported as `benchlib`: scripts run with scripts/ on sys.path)."""

from __future__ import annotations

import socket


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
