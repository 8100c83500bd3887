"""Follow the catalogue's change log into the live engine's delta.

Every process runs one follower thread: every `sync_s` it reads the SKUs changed after the engine's delta
(`CatalogueStore.changes_since`), turns them into delta products with their stored vectors and swaps the next
`Delta` into the engine. The process that took a write applies it at once (`sync`, called after the commit), so
its own searches see it before the 2xx is sent. A new index version catches up before it is swapped in.

Vectors are read, not recomputed: the writer stored them for its model. Only an image stored for another model
(a model rollout) is embedded here, from its stored bytes, and the vector stored for the next process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.catalogue.store import CatalogueRewound, CatalogueStore, ProductState
from app.engine.delta import Delta, DeltaImage, DeltaProduct
from app.engine.search import SearchEngine
from app.errors import CatalogueUnavailable, ServiceError

log = logging.getLogger(__name__)

EngineGetter = Callable[[], SearchEngine | None]  # the live engine, read each time (a reload swaps it)
Observer = Callable[["SearchEngine | None", "SyncStatus"], None]  # after every sync attempt (metrics)


@dataclass
class SyncStatus:
    ok: bool = True
    reason: str | None = None  # why the last sync failed (safe to show: no exception text)
    last_ok_at: float = 0.0  # unix seconds of the last successful sync
    lag_s: float = 0.0  # commit -> applied, for the last change applied


class CatalogueFollower:
    def __init__(
        self, store: CatalogueStore, sync_s: float, observe: Observer | None = None, *, max_delta_skus: int = 100_000
    ) -> None:
        self.store = store
        self.sync_s = sync_s
        # Changed SKUs a delta holds at most: beyond, this process waits for a compacted version instead of
        # holding a whole re-imported catalogue in memory and scanning it exactly on every query.
        self.max_delta_skus = max_delta_skus
        self.status = SyncStatus(last_ok_at=time.time())  # lag counts from start-up until a first good sync
        self._observe = observe or (lambda _engine, _status: None)
        self.schema_ready = False
        self._lock = threading.Lock()  # one delta update at a time: the thread, writes and reloads all apply
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sync(self, engine: SearchEngine) -> int:
        """Apply every change after the engine's delta; returns how many SKUs changed. Raises
        CatalogueUnavailable when the database cannot be read (the engine keeps its last delta)."""
        with self._lock:
            delta = engine.delta
            model = engine.embedder.card.sha256
            if engine.manifest.catalogue_id not in (None, self.store.catalogue_id()):
                self._failed("the index version was built from another catalogue database")
                return 0
            room = self.max_delta_skus - len(delta.products)
            try:
                batch = self.store.changes_since(delta.seq, model, max_skus=max(room, 1))
            except CatalogueRewound as exc:
                # What was applied past the counter may not exist any more: start again from the version.
                log.error("catalogue rewound: live changes are re-read from the index version (%s)", exc)
                engine.delta = delta = Delta.empty(delta.base_seq)
                try:
                    batch = self.store.changes_since(delta.seq, model, max_skus=max(self.max_delta_skus, 1))
                except CatalogueRewound:
                    self._failed("the catalogue database is behind the index version (restored from an older backup?)")
                    return 0
            if batch.head <= delta.seq:
                self._ok(0.0)
                return 0
            if len(batch.products.keys() - delta.products.keys()) > room:
                self._failed(f"more changed products than VPS_MAX_DELTA_SKUS ({self.max_delta_skus}): waiting for "
                             "a compacted index version")  # fmt: skip
                return 0
            updates = {sku: self._product(state, engine) for sku, state in batch.products.items()}
            engine.delta = delta.applied(updates, batch.head, batch.head_at, batch.changed_at)
            self._ok(max(0.0, time.time() - batch.head_at))
            return len(updates)

    def catch_up(self, engine: SearchEngine, previous: SearchEngine | None = None) -> None:
        """Before a new engine is swapped in: start from what the previous engine serves when that is at least as
        new as the version (its products are whole states, newer than the version's rows), then bring it to the
        catalogue's head. Best effort: never fails a reload; the thread retries."""
        if previous is not None and engine.delta.seq == engine.delta.base_seq:
            engine.delta = engine.delta.carried_from(previous.delta)
        try:
            while self.sync(engine):
                pass
        except CatalogueUnavailable:
            log.warning("catalogue unreachable: the new index version serves the changes it had until it is back")
        except Exception:  # a reload must not fail on the follower; the thread retries and logs
            log.exception("catalogue catch-up failed")

    def sync_quietly(self, engine: SearchEngine) -> None:
        """After a committed write: apply it here, never turning the write's success into an error."""
        try:
            self.sync(engine)
        except CatalogueUnavailable:
            pass  # the thread retries
        except Exception:
            log.exception("catalogue sync after a write failed")

    def start(self, engine_of: EngineGetter) -> None:
        self._thread = threading.Thread(target=self._run, args=(engine_of,), name="vps-catalogue-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def open(self) -> bool:
        """Create the schema if needed (idempotent). False, and the status says why, when the database cannot be
        reached: the thread keeps trying, so a database that comes back is followed without a restart."""
        try:
            self.store.create_schema()
        except CatalogueUnavailable:
            self._failed("the catalogue database cannot be reached")
            return False
        self.schema_ready = True
        return True

    def _run(self, engine_of: EngineGetter) -> None:
        while not self._stop.wait(self.sync_s):
            engine = engine_of()
            if engine is None or (not self.schema_ready and not self.open()):
                if engine is not None:
                    self._observe(engine, self.status)
                continue
            try:
                self.sync(engine)
            except CatalogueUnavailable:
                self._failed("the catalogue database cannot be reached")
            except Exception:  # the thread must outlive any one bad sync; the next one retries
                log.exception("catalogue sync failed")
                self._failed("catalogue sync failed (see the log)")
            self._observe(engine, self.status)

    def _product(self, state: ProductState | None, engine: SearchEngine) -> DeltaProduct | None:
        if state is None:
            return None
        images = []
        for img in state.images:
            vector = img.vector if img.vector is not None else self._embed_stored(img.sha256, engine)
            if vector is not None:
                images.append(DeltaImage(img.image_id, vector))
        return DeltaProduct(state.sku, state.category, state.title, state.attributes, tuple(images))

    def _embed_stored(self, sha256: str, engine: SearchEngine) -> np.ndarray | None:
        data = self.store.blob(sha256)
        if data is None:
            return None
        try:
            vector, _ = engine.embed_image(data)
        except ServiceError:
            log.warning("a stored catalogue image does not decode with this model's limits", extra={"sha256": sha256})
            return None
        self.store.put_embedding(sha256, engine.embedder.card.sha256, vector)
        return vector

    def _ok(self, lag_s: float) -> None:
        self.status = SyncStatus(True, None, time.time(), lag_s)

    def _failed(self, reason: str) -> None:
        s = self.status
        if s.ok:
            log.warning("catalogue sync failing: %s", reason)
        self.status = SyncStatus(False, reason, s.last_ok_at, time.time() - s.last_ok_at if s.last_ok_at else 0.0)
