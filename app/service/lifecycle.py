"""What happens to a running service besides requests: index reloads without downtime, the CURRENT watch, and
draining on SIGTERM.

Reload: load the version CURRENT names in a thread (never on the event loop), verify it completely, warm it up,
then swap `AppState.engine` in one assignment. A request takes its engine once at its start
(`app/service/http/routes.py`), so requests in flight finish on the version they started on; the old engine is
released when the last of them drops its reference. A refused version leaves the live one serving.

The one exception to "verify completely" is a process's first load with `VPS_VERIFY_SHARDS=background`: nothing
serves yet, so it goes live once all but the shards are verified, and a background thread hashes and loads the
shards, each before its first read (app/engine/pending.py).

Drain: SIGTERM turns /readyz 503 at once while requests are still served for `drain_s` (load balancers and
Kubernetes endpoints stop sending), then uvicorn stops accepting, finishes requests in flight and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import anyio.to_thread
import uvicorn

from app.artifacts.manifest import resolve_current
from app.engine.embedding import Embedder
from app.engine.pending import PendingShards
from app.engine.search import SearchEngine
from app.errors import ArtifactError, ShardUnavailable
from app.service.config import Settings
from app.service.state import AppState, ReloadOutcome

log = logging.getLogger(__name__)

EngineLoader = Callable[[Settings, Embedder | None], SearchEngine]
Warmup = Callable[[SearchEngine, int], None]


class IndexReloader:
    """Serialises loads (start-up, /admin/reload, the CURRENT watch) and swaps the live engine atomically."""

    def __init__(self, state: AppState, loader: EngineLoader, warm_up: Warmup) -> None:
        self._state = state
        self._loader = loader
        self._warm_up = warm_up
        self._lock = asyncio.Lock()
        self._refused: str | None = None  # CURRENT target last refused: the watch does not retry it

    def _load(self) -> SearchEngine:
        live = self._state.engine
        # The model does not change between index versions: reuse its ONNX session (the manifest check refuses
        # an index built with another model).
        settings = self._state.settings
        if live is not None:  # a swap goes live fully verified, as before: the old version serves meanwhile
            settings = settings.model_copy(update={"verify_shards": "before_ready"})
        engine = self._loader(settings, live.embedder if live is not None else None)
        if live is not None:
            engine.decode_budget = live.decode_budget  # one decode budget per process, across versions
        try:
            self._warm_up(engine, self._state.settings.warmup_queries)
        except ShardUnavailable:  # a first start's warm-up met a shard that failed its hash: refused, as before
            raise ArtifactError(engine.pending.failure if engine.pending else "index shard refused") from None
        if self._state.catalogue is not None:
            self._state.catalogue.catch_up(engine, live)  # live changes after the version's sequence number
        return engine

    async def reload(self, *, only_if_changed: bool = False) -> ReloadOutcome:
        async with self._lock:
            state, metrics = self._state, self._state.metrics
            previous = state.engine.manifest.version if state.engine is not None else None
            if only_if_changed:
                target = _current_name(state.settings)
                if target is None or target == previous or target == self._refused:
                    return ReloadOutcome("unchanged", previous, previous)
            t0 = time.perf_counter()
            try:
                engine = await anyio.to_thread.run_sync(self._load)
            except ArtifactError as exc:
                self._refused = _current_name(state.settings)
                if state.engine is None:
                    state.load_error = str(exc)
                metrics.index_reloads.labels(result="failed").inc()
                log.error("index version refused: %s", exc, extra={"live_version": previous})
                return ReloadOutcome("failed", previous, previous, reason=str(exc))
            load_s = time.perf_counter() - t0
            live = state.engine
            repaired = live is not None and live.pending is not None and live.pending.failure is not None
            if previous is not None and engine.manifest.version == previous and not only_if_changed and not repaired:
                # Same version: keep the live engine (nothing to swap), but count a successful verification.
                metrics.index_reloads.labels(result="success").inc()
                return ReloadOutcome("unchanged", previous, previous, load_s=load_s)
            old = state.engine
            state.engine = engine  # the swap: one reference assignment
            _watch_shards(state, engine)
            if engine.pending is not None:  # a first start: its shards verify after ready (app/engine/pending.py)
                pending = engine.pending
                threading.Thread(target=_verify_pending, args=(pending,), name="vps-verify-shards", daemon=True).start()
            if state.catalogue is not None:
                # Writes applied to the old engine between the catch-up and the swap.
                await anyio.to_thread.run_sync(state.catalogue.catch_up, engine)
            state.load_error = None
            state.ready = True
            target = _current_name(state.settings)
            # A fallback to an earlier version: the watch does not retry CURRENT until it changes.
            self._refused = target if target != engine.manifest.version else None
            metrics.index_reloads.labels(result="success").inc()
            metrics.index_items.set(engine.manifest.n_items)
            if old is not None:
                _forget_build_info(state, old)
            metrics.build_info.labels(model=engine.embedder.card.name, index_version=engine.manifest.version).set(1)
            log.info(
                "index version live",
                extra={"index_version": engine.manifest.version, "previous": previous, "load_s": round(load_s, 4)},
            )
            return ReloadOutcome("success", previous, engine.manifest.version, load_s=load_s)

    async def watch(self, interval_s: float) -> None:
        """Poll CURRENT; load a new version when it changes. A refused version is not retried until CURRENT
        changes again."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload(only_if_changed=True)
            except Exception:  # the watch must outlive any surprise; the reason is logged
                log.exception("index watch failed")


def _watch_shards(state: AppState, engine: SearchEngine) -> None:
    """vps_index_shards follows the live engine: all verified, or its pending shards as each settles."""
    metrics = state.metrics
    if engine.pending is None:
        metrics.set_shards(len(engine.shards), 0, 0)
        return

    def update(pending: PendingShards) -> None:
        if state.engine is engine:  # an engine swapped out since must not overwrite the live one's figures
            loaded, refused = pending.loaded, pending.refused
            metrics.set_shards(loaded, len(pending.shards) - loaded - refused, refused)

    engine.pending.watch(update)


def _verify_pending(pending: PendingShards) -> None:
    """The background pass of a first start; a refused shard is logged by it and turns /readyz 503."""
    with contextlib.suppress(ArtifactError):
        pending.run()


def _current_name(settings: Settings) -> str | None:
    try:
        return resolve_current(settings.index_dir).name
    except ArtifactError:
        return None


def _forget_build_info(state: AppState, old: SearchEngine) -> None:
    # 0 first: in multiprocess mode the value lives on in this worker's file, and `livemax` must not show it.
    state.metrics.build_info.labels(model=old.embedder.card.name, index_version=old.manifest.version).set(0)
    with contextlib.suppress(KeyError):
        state.metrics.build_info.remove(old.embedder.card.name, old.manifest.version)


# --- SIGTERM drain ----------------------------------------------------------------------------------------------
def install_sigterm_drain(state: AppState, drain_s: float) -> Callable[[], None] | None:
    """Take over SIGTERM from uvicorn inside a worker: mark the app draining (/readyz 503), keep serving for
    `drain_s`, then ask uvicorn to shut down gracefully. uvicorn's own handler would re-raise SIGTERM after its
    graceful shutdown, so the process would die by the signal (exit 143); asking its server to exit instead gives
    exit 0. Returns a function restoring the previous handler, or None outside the main thread (tests)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        server = getattr(previous, "__self__", None)
        if isinstance(server, uvicorn.Server):
            server.should_exit = True
        elif callable(previous):
            previous(signal.SIGTERM, None)
        else:  # no uvicorn server around us: let the default action end the process
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if state.draining:
            return
        state.draining = True
        log.info("SIGTERM: draining", extra={"drain_s": drain_s, "inflight": state.runner.inflight})
        loop.call_soon_threadsafe(loop.call_later, drain_s, stop)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        handler: Any = previous
        signal.signal(signal.SIGTERM, handler)

    return restore
