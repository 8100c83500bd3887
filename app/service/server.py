"""The HTTP server: uvicorn with its httptools protocol, plus the limits it lacks. A request head (request line and
headers) is bounded in bytes, header count and time (431 / 408); a connection's first head must arrive within the
time too. Beyond `max_connections` requests in progress, a request is refused with the JSON 503 `overloaded` and
Retry-After, except /healthz, /readyz and /metrics: those never count and are never refused, so idle or slow
clients cannot fail the probes. Every refusal here is the service's JSON error, like the app's own."""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from app.service.config import Settings
from app.service.http.errors import PROBE_PATHS, error_payload
from app.service.state import AppState

log = logging.getLogger("app.http")

_PROBES = frozenset(p.encode() for p in PROBE_PATHS)
# After a refusal the server stops writing and reads (discarding) for this long before closing: a client still
# sending its head then reads the answer instead of a connection reset.
LINGER_S = 2.0


@dataclass(frozen=True)
class HttpLimits:
    max_head_bytes: int = 32 * 1024
    max_headers: int = 100
    head_timeout_s: float = 10.0
    max_requests: int | None = 256  # requests in progress per worker (probes excepted); None: no cap
    retry_after_s: int = 1
    # Bytes of one message after its head: the upload cap, plus room for chunk framing and trailers (a chunked
    # body's trailers are parsed after the head, so without this a 64 MB trailer stalled the loop as a head did).
    max_body_bytes: int = 10 * 1024 * 1024 + 64 * 1024
    # Catalogue image writes (/v1/products/...) carry up to VPS_MAX_IMAGES_PER_WRITE images: their own bound.
    max_write_body_bytes: int = 16 * 10 * 1024 * 1024 + 64 * 1024
    # Batch searches (/v1/search/batch) carry up to VPS_MAX_BATCH_IMAGES images.
    max_batch_body_bytes: int = 16 * 10 * 1024 * 1024 + 64 * 1024

    @classmethod
    def from_settings(cls, s: Settings) -> HttpLimits:
        body = s.max_upload_bytes + 64 * 1024 + s.max_header_bytes
        write = s.max_images_per_write * s.max_upload_bytes + 64 * 1024 + s.max_header_bytes
        batch = min(s.max_batch_bytes, s.max_batch_images * s.max_upload_bytes) + 64 * 1024 + s.max_header_bytes
        return cls(
            s.max_header_bytes, s.max_headers, s.head_timeout_s, s.max_connections, s.retry_after_s, body, write, batch
        )

    def body_cap(self, url: bytes) -> int:
        if url.startswith(CATALOGUE_WRITE_PREFIX):
            return self.max_write_body_bytes
        if url.startswith(BATCH_SEARCH_PATH):
            return self.max_batch_body_bytes
        return self.max_body_bytes


CATALOGUE_WRITE_PREFIX = b"/v1/products/"
BATCH_SEARCH_PATH = b"/v1/search/batch"


def _app_state(app: Any) -> AppState | None:
    """The service state behind uvicorn's wrappers (each keeps the app it wraps as `.app`), if it is our app."""
    for _ in range(8):
        state = getattr(getattr(app, "state", None), "vps", None)
        if isinstance(state, AppState):
            return state
        app = getattr(app, "app", None)
        if app is None:
            break
    return None


def error_body(code: str, message: str, request_id: str) -> bytes:
    return json.dumps(error_payload(code, message, request_id)).encode()


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head limits and its own request cap (see the module docstring).
    `http=LimitedHttpProtocol` in uvicorn's Config or run(); the limits come from the served app's settings."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.vps = _app_state(self.app)
        self.limits = HttpLimits.from_settings(self.vps.settings) if self.vps is not None else HttpLimits()
        self.limit_concurrency = None  # uvicorn's own refusal (plain text, probes included) replaced below
        self._in_head = True  # the bytes that arrive now belong to a request head
        self._head_bytes = 0
        self._head_fields = 0
        self._body_bytes = 0  # fed since the head completed
        self._messages = 0  # requests read completely on this connection
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str, str] | None = None  # set by a parser callback that refuses the head
        self._refused = False  # answered and lingering: what arrives is discarded

    # Connection events.
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head and self._head_timer is None:
            # Bytes between messages (a client sending CRLFs after a response) begin no message in the parser,
            # but end uvicorn's keep-alive timer: the head timer runs from them, or they held a connection forever.
            self._arm_head_timer()
        # While a head is incomplete, at most the bytes left in its budget go to the parser; if that same head is
        # still not complete then, 431. A head that starts after a body inside one read (pipelining) is counted
        # from the next read on: at most one read (256 KiB) more, its fields still counted one by one.
        while data and self._in_head:
            room = self.limits.max_head_bytes - self._head_bytes
            chunk, data = data[:room], data[room:]
            self._head_bytes += len(chunk)
            messages = self._messages
            if chunk and not self._feed(chunk):
                return
            if data and self._in_head and self._messages == messages:
                self._refuse(431, "headers_too_large", f"the request head exceeds {self.limits.max_head_bytes} bytes")
                return
        if data:
            self._body_bytes += len(data)
            cap = self.limits.body_cap(self.url)
            if self._body_bytes > cap:
                self._refuse(413, "request_too_large", f"the request exceeds {cap} bytes")
                return
            self._feed(data)

    def _feed(self, data: bytes) -> bool:
        """uvicorn's data_received, with refusals as JSON. False when the connection was refused."""
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            status, code, message = self._refusal or (400, "invalid_http", "the request is not valid HTTP/1.1")
            self._refuse(status, code, message)
            return False
        return not self._refused

    # Parser callbacks.
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head, self._head_fields = True, 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.limits.max_headers:
            self._refusal = (431, "too_many_headers", f"the request has more than {self.limits.max_headers} headers")
            raise _HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head, self._body_bytes = False, 0
        self._cancel_head_timer()
        cap = self.limits.max_requests
        if cap is None or len(self.tasks) < cap or self._is_probe():
            super().on_headers_complete()
            return
        app, self.app = self.app, self._overloaded  # uvicorn starts (or queues) the request with self.app
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0
        self._messages += 1

    def _is_probe(self) -> bool:
        try:
            return self.parser.get_method() == b"GET" and httptools.parse_url(self.url).path in _PROBES
        except httptools.HttpParserError:
            return False

    async def _overloaded(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = os.urandom(12).hex()
        self._count("overloaded", request_id)
        body = error_body("overloaded", "the service is at capacity; retry shortly", request_id)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(self.limits.retry_after_s).encode()),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    # Head timeout.
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()  # nothing of a request was sent: nothing to answer
            return
        self._refuse(408, "request_timeout", f"the request head took longer than {self.limits.head_timeout_s:g} s")

    # Refusals.
    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer `status` with the JSON error and Connection: close, then linger and close."""
        self._cancel_head_timer()
        self._refused = True
        if self.cycle is not None and not self.cycle.response_complete:
            # A response is still due: no answer in its middle. A request whose body was still arriving (a broken
            # chunked body) is cut off, as uvicorn does (its app sees a disconnect); else (a pipelined head is
            # refused) the connection closes once that response is written.
            if self.cycle.more_body:
                self.transport.close()
            else:
                self.cycle.keep_alive = False
            return
        request_id = os.urandom(12).hex()
        self._count(code, request_id)
        body = error_body(code, message, request_id)
        head = [STATUS_LINE[status]]
        for name, value in [
            *self.server_state.default_headers,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            (b"x-request-id", request_id.encode()),
        ]:
            head.extend([name, b": ", value, b"\r\n"])
        self.transport.write(b"".join([*head, b"\r\n", body]))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)

    def _count(self, code: str, request_id: str) -> None:
        log.info("refused", extra={"request_id": request_id, "code": code, "client": self.client})
        if self.vps is not None:
            self.vps.metrics.rejected.labels(reason=code).inc()


class _HeadRefused(Exception):
    """Raised in a parser callback to stop parsing; the reason is in `_refusal`."""


def run(*, host: str, port: int, workers: int) -> None:
    """Serve `app_factory` with the limited protocol. Every worker process builds its app from the same VPS_*
    environment, and each connection's protocol takes its limits from that app's settings."""
    uvicorn.run(
        "app.service.app:app_factory",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        http=LimitedHttpProtocol,
        log_config=None,
        access_log=False,
        # After the drain (VPS_DRAIN_S), requests in flight get this long to finish.
        timeout_graceful_shutdown=30,
        # The request cap is LimitedHttpProtocol's (max_connections), not uvicorn's limit_concurrency.
        limit_concurrency=None,
    )
