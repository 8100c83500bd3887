"""create_app(settings): the FastAPI app. Its lifespan loads and checks the heavy resources, warms them up,
then marks the service ready. Requests enter through `app/service/http/routes.py`."""

from __future__ import annotations

import asyncio
import faulthandler
import io
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
import numpy as np
from fastapi import FastAPI
from fastapi.routing import APIRoute
from PIL import Image
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.catalogue.follow import CatalogueFollower, SyncStatus
from app.catalogue.store import CatalogueStore
from app.engine.imaging import limit_malloc_arenas
from app.engine.search import SearchEngine, resolve_params
from app.service.capture import QueryCapture
from app.service.compactor import AutoCompactor
from app.service.config import Settings
from app.service.engines import load_engine, search_defaults
from app.service.http.admin import admin
from app.service.http.catalogue import catalogue
from app.service.http.errors import PROBE_PATHS, error_response, install_error_handlers, plain_route
from app.service.http.routes import router, search
from app.service.http.web import DOCS_ASSETS, docs_assets, web
from app.service.lifecycle import EngineLoader, IndexReloader, install_sigterm_drain
from app.service.logs import configure_logging
from app.service.metrics import Metrics, mark_this_process_dead
from app.service.runner import BoundedRunner
from app.service.shadow import ShadowSampler
from app.service.state import AppState

log = logging.getLogger("app")
access_log = logging.getLogger("app.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
UNMATCHED = "unmatched"  # the route label of requests no route matched (404s, bounded cardinality)
MAX_LOGGED_PATH = 256


class ObserveMiddleware:
    """Request id (from X-Request-ID if sane, else new), metrics by route template, one access-log line, and the
    last-resort 500: an unexpected exception becomes `internal_error` with the request id, its text only logged.
    Plain ASGI, not BaseHTTPMiddleware: that one costs a task group and a stream per request (profiled here)."""

    def __init__(
        self, app: ASGIApp, state: AppState, plain_routes: frozenset[str] = frozenset(), mounts: tuple[str, ...] = ()
    ) -> None:
        self.app, self.state, self.metrics = app, state, state.metrics
        # FastAPI's own page (/openapi.json) is a plain Starlette route, and a mount (/docs/assets) serves files
        # under a prefix; FastAPI's router leaves no route in the scope for either: matched by the fixed path or
        # labelled by the prefix instead, so they are not counted as "unmatched" with the 404s.
        self._plain_routes = plain_routes
        self._mounts = tuple(m.rstrip("/") + "/" for m in mounts)
        hosts = state.settings.allowed_hosts
        self._allowed_hosts = frozenset(h.lower() for h in hosts) if hosts else None
        # Request ids: a random per-process prefix and a counter, unique across workers and restarts without a
        # system call per request (uuid4 reads os.urandom each time). Not secrets: they only correlate logs.
        self._id_prefix, self._id_counter = os.urandom(8).hex(), itertools.count()
        # Labelled metric children by (route, status): labels() takes a lock and builds a key on each call. As
        # bounded as the labels themselves (route templates, HTTP statuses).
        self._children: dict[tuple[str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else f"{self._id_prefix}{next(self._id_counter):016x}"
        scope.setdefault("state", {})["request_id"] = request_id  # what request.state.request_id reads
        status, started = 500, False
        t0 = time.perf_counter()
        app: ASGIApp = self.app
        if (
            self._allowed_hosts is not None
            and scope["path"] not in PROBE_PATHS
            and _host(scope) not in self._allowed_hosts
        ):
            app = error_response(
                400, "invalid_host", "the Host header names no host this service answers for", request_id
            )

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
                if self.state.draining:
                    # Shutting down: no keep-alive, so no client sends its next request on a connection that
                    # is about to be closed under it (seen as a RemoteProtocolError in the drain test).
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        try:
            await app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error", extra={"request_id": request_id})
            status = 500
            if not started:
                await error_response(500, "internal_error", "internal error", request_id)(scope, receive, send_with_id)
        template = self._route_label(scope, status)
        elapsed = time.perf_counter() - t0
        self._count(template, status, elapsed)
        extra = {
            "request_id": request_id,
            "method": scope["method"],
            "route": template,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
        }
        if status == 404 or template == UNMATCHED:
            # The template alone cannot say what was missing; the path (bounded) can. Logs only, never a label.
            extra["path"] = scope["path"][:MAX_LOGGED_PATH]
        access_log.info("request", extra=extra)

    def _count(self, template: str, status: int, elapsed: float) -> None:
        children = self._children.get((template, status))
        if children is None:
            children = self._children[(template, status)] = (
                self.metrics.requests.labels(route=template, status=str(status)),
                self.metrics.request_duration.labels(route=template),
            )
        children[0].inc()
        children[1].observe(elapsed)

    def _route_label(self, scope: Scope, status: int) -> str:
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", UNMATCHED))
        if status != 404 and scope["path"] in self._plain_routes:
            return str(scope["path"])
        if status != 404:
            for prefix in self._mounts:
                if scope["path"].startswith(prefix):
                    return prefix.rstrip("/")
        return UNMATCHED


class ServiceApp(FastAPI):
    """FastAPI with plain lanes: the routes in `lanes` (POST /search) are served as plain ASGI apps ahead of
    Starlette's middleware stack and FastAPI's router, which cost the hot path event-loop CPU on every request
    (docs/benchmarks.md, "POST /search on a plain ASGI lane"). A lane keeps its APIRoute (the OpenAPI schema, the
    metrics label), runs inside its own ObserveMiddleware, and maps errors through the app's functions
    (`plain_route` in app/service/http/errors.py); every other request takes FastAPI's path."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lanes: dict[tuple[str, str], ASGIApp] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.lanes and not self._telemetry_on():
            lane = self.lanes.get((scope["method"], route_path(scope)))
            if lane is not None:
                scope["app"] = self
                await lane(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _telemetry_on(self) -> bool:
        """FastAPI's own OpenTelemetry (newer FastAPI, when a provider is configured) wraps requests in its
        `__call__`: then every request takes that path, so POST /search keeps its spans and trace propagation."""
        telemetry = getattr(self, "_native_telemetry", None)
        return telemetry is not None and bool(telemetry.enabled())


def route_path(scope: Scope) -> str:
    """The path a router matches: without the root path a proxy mounted the service under (Starlette's rule)."""
    path, root = str(scope["path"]), str(scope.get("root_path", ""))
    if root and path.startswith(root) and path[len(root) : len(root) + 1] == "/":
        return path[len(root) :]
    return path


def _host(scope: Scope) -> str:
    """The Host header's host, lower-cased, without its port (an IPv6 literal keeps its brackets)."""
    host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "").strip().lower()
    if host.startswith("["):
        return host.split("]", 1)[0] + "]"
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def warm_up(engine: SearchEngine, queries: int) -> None:
    """Run the whole path a few times so the first real request does not pay for lazy initialisation."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buf, format="JPEG")
    for _ in range(queries):
        engine.search_image(buf.getvalue(), resolve_params(engine.manifest, k=5))


def open_catalogue(settings: Settings, metrics: Metrics, reload: Callable[[], None] | None) -> CatalogueFollower:
    """The catalogue database and its follower (with automatic compaction past VPS_COMPACT_ABOVE, reloading here
    through `reload`). A database that cannot be reached at start-up does not stop the service: writes answer 503
    and the follower keeps trying (it creates the schema once the database answers)."""
    store = CatalogueStore(settings.catalogue_database_url())
    compactor = None
    if settings.compact_above > 0 and reload is not None:
        compactor = AutoCompactor(settings, store, metrics, reload)

    def observe(engine: SearchEngine | None, status: SyncStatus) -> None:
        metrics.sync_lag.set(status.lag_s)
        if not status.ok:
            metrics.sync_failures.inc()
        if engine is not None:
            metrics.delta_items.set(engine.delta.n_items)
            if compactor is not None:
                compactor.maybe(engine)

    follower = CatalogueFollower(store, settings.sync_s, observe, max_delta_skus=settings.max_delta_skus)
    if not follower.open():
        log.error("catalogue database unavailable at start-up: writes are refused until it answers")
    return follower


def reload_from_thread(reloader: IndexReloader) -> Callable[[], None]:
    """A reload of CURRENT's version that a background thread can call (it waits for the event loop's reload)."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        asyncio.run_coroutine_threadsafe(reloader.reload(only_if_changed=True), loop).result(timeout=600)

    return reload


def start_threads(state: AppState) -> None:
    """Started in the lifespan, not in create_app: inside the worker process, and stopped (no leaked threads)."""
    state.shadow.start()
    state.capture.start()
    if state.catalogue is not None:
        state.catalogue.start(lambda: state.engine)


def stop_threads(state: AppState) -> None:
    if state.engine is not None and state.engine.pending is not None:
        state.engine.pending.stop()  # a shard verification pass still running ends with the shards in hand
    state.shadow.stop()
    state.capture.stop()
    if state.catalogue is not None:
        state.catalogue.stop()
        state.catalogue.store.close()
    state.runner.shutdown()


def new_state(settings: Settings, metrics: Metrics) -> AppState:
    """The state the lifespan fills: settings, metrics, the bounded runner, the samplers (threads not started)."""
    return AppState(
        settings=settings,
        metrics=metrics,
        runner=BoundedRunner(
            settings.pool_threads, settings.admission_limit, metrics.inflight, waits=metrics.admission_wait
        ),
        shadow=ShadowSampler(settings.shadow_sample, settings.shadow_queue, metrics),
        capture=QueryCapture(
            settings.capture_sample,
            settings.capture_dir,
            settings.capture_max_bytes,
            settings.capture_max_age_s,
            settings.capture_queue,
            metrics,
        ),
        search_defaults=search_defaults(settings),
    )


def add_routes(app: ServiceApp, state: AppState) -> None:
    """The routes, the error handlers, the observing middleware, and POST /search's plain lane."""
    install_error_handlers(app, state.settings.retry_after_s, state.metrics)
    app.include_router(router)
    app.include_router(admin)
    app.include_router(catalogue)
    app.include_router(web)
    app.mount(DOCS_ASSETS, docs_assets(), name="docs-assets")

    # Routes without path parameters that FastAPI adds itself (the schema): no APIRoute, maybe no route in the scope.
    plain = frozenset(r.path for r in app.routes if isinstance(r, Route) and not isinstance(r, APIRoute))
    mounts = tuple(r.path for r in app.routes if isinstance(r, Mount))
    app.add_middleware(ObserveMiddleware, state=state, plain_routes=plain, mounts=mounts)
    search_route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == "/search")
    lane = plain_route(search, search_route, state.settings.retry_after_s, state.metrics)
    app.lanes[("POST", "/search")] = ObserveMiddleware(lane, state)


def create_app(settings: Settings, loader: EngineLoader = load_engine) -> ServiceApp:
    metrics = Metrics()
    state = new_state(settings, metrics)

    reloader = IndexReloader(state, loader, warm_up)
    state.reloader = reloader

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t0 = time.perf_counter()
        reload = reload_from_thread(reloader)
        state.catalogue = await anyio.to_thread.run_sync(open_catalogue, settings, metrics, reload)
        # A refused model or index: never ready; one log line names the file and both values. The watch and
        # /admin/reload can still bring a good version in.
        outcome = await reloader.reload()
        if outcome.result == "success":
            log.info("ready", extra={"startup_s": round(time.perf_counter() - t0, 4)})
        restore_sigterm = install_sigterm_drain(state, settings.drain_s)
        watch = asyncio.create_task(reloader.watch(settings.index_watch_s)) if settings.index_watch_s > 0 else None
        start_threads(state)
        try:
            yield
        finally:
            state.ready = False
            if watch is not None:
                watch.cancel()
            if restore_sigterm is not None:
                restore_sigterm()
            stop_threads(state)
            mark_this_process_dead()

    app = ServiceApp(
        title="Visual product search",
        version="0.1.0",
        summary="POST a product photo, get the top-k matching SKUs.",
        lifespan=lifespan,
        # Starlette's slash redirect builds an absolute Location from the Host header (`GET /healthz/` with
        # `Host: evil.example` answered 307 to http://evil.example/healthz): no redirects, a JSON 404 instead.
        redirect_slashes=False,
        # /docs is web.py's: Swagger UI from this app's own files, not a CDN, under a strict CSP. No ReDoc.
        docs_url=None,
        redoc_url=None,
    )
    app.state.vps = state
    add_routes(app, state)
    return app


def app_factory() -> ServiceApp:
    """Entry point for `uvicorn --factory` and `vps serve`: settings from the environment, JSON logs."""
    settings = Settings()
    configure_logging(settings.log_level)
    limit_malloc_arenas()  # memory freed after large decodes goes back to the system (app/engine/imaging.py)
    # A fatal signal (SIGBUS from a mapped index file truncated under the server) leaves a traceback in the log
    # instead of a silent death.
    faulthandler.enable()
    return create_app(settings)
