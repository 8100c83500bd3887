"""Shards verified after the service starts, none of them read before its own hash passed.

On a first start from a cold page cache, hashing a large index is bound by the disk (the 1M-vector index: 2.2 GB,
3.2 s here, docs/benchmarks.md), and faiss then reads each HNSW graph into memory (1.7 s more). With
`VPS_VERIFY_SHARDS=background` the service is ready once the manifest, router, item table and attributes are
verified and every file's size checked; each shard is then hashed and loaded by a background pass, or on demand by
the first search that routes to it, whichever comes first (one lock per shard: done once). A shard whose hash
fails is never read: the searches that need it answer 503 `shard_unavailable` and /readyz turns 503, so the
replica leaves its load balancer. A swap to a new version never goes live this way: the reloader runs the pass to
completion first (app/service/lifecycle.py), as it verifies everything else, while the old version serves.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app.artifacts.manifest import HASH_THREADS, IndexFiles
from app.artifacts.shards import ShardIndex
from app.errors import ArtifactError, ShardUnavailable

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


class PendingShard:
    """A ShardIndex whose file is verified and loaded on first use. `dim` and `ntotal` come from the manifest,
    checked against the loaded index when it loads."""

    def __init__(self, files: IndexFiles, rel: str, dim: int, n_vectors: int, load: Callable[[], ShardIndex]) -> None:
        self.rel, self._files, self._dim, self._n, self._load = rel, files, dim, n_vectors, load
        self._index: ShardIndex | None = None
        self.error: str | None = None  # why it was refused (logged once, never sent to a client)
        self.settled: Callable[[], None] = _nothing  # called once it is loaded or refused (PendingShards.watch)
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._index is not None

    def ready(self) -> ShardIndex:
        """The verified, loaded index; ShardUnavailable when its file failed verification."""
        index = self._index
        if index is not None:
            return index
        with self._lock:
            if self._index is None and self.error is None:
                self._verify_and_load()
                self.settled()
            if self._index is None:
                raise ShardUnavailable()
            return self._index

    def _verify_and_load(self) -> None:
        try:
            self._files.verify([self.rel])
            index = self._load()
            if index.ntotal != self._n:
                raise ArtifactError(
                    f"shard {self._files.path(self.rel)}: vectors expected {self._n} (manifest), got {index.ntotal}"
                )
        except ArtifactError as exc:
            self.error = str(exc)
            log.error("index shard refused: %s", exc, extra={"shard": self.rel})
            return
        except Exception as exc:  # an unreadable file (EIO, EACCES, a pruned version) or faiss: refused too
            self.error = f"shard {self._files.path(self.rel)}: cannot be read ({type(exc).__name__})"
            log.error("index shard refused: %s", self.error, exc_info=True, extra={"shard": self.rel})
            return
        self._index = index

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return self._n

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.ready().search(queries, k)

    def vectors(self) -> np.ndarray:
        return self.ready().vectors()

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.ready().rows(ids)

    def search_subset(
        self, queries: np.ndarray, k: int, allowed: np.ndarray, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.ready().search_subset(queries, k, allowed, ef_search)


class PendingShards:
    """The shards of one engine still to verify, and the pass that verifies them all."""

    def __init__(self, files: IndexFiles, shards: list[PendingShard], threads: int | None = None) -> None:
        self.files, self.shards = files, shards
        self.threads = threads or HASH_THREADS
        self.done = threading.Event()
        self._stop = threading.Event()

    @property
    def loaded(self) -> int:
        return sum(s.loaded for s in self.shards)

    @property
    def refused(self) -> int:
        return sum(s.error is not None for s in self.shards)

    def watch(self, listener: Callable[[PendingShards], None]) -> None:
        """Call `listener(self)` now and each time a shard is loaded or refused (the service's shard gauges)."""
        for shard in self.shards:
            shard.settled = lambda: listener(self)
        listener(self)

    @property
    def failure(self) -> str | None:
        """The first refused shard's reason, or None."""
        return next((s.error for s in self.shards if s.error is not None), None)

    def run(self) -> None:
        """Verify and load every shard not yet loaded (`threads` at a time: hashing releases the GIL), then record
        the verification for the next start. Raises ArtifactError with the first refusal."""
        t0 = time.perf_counter()
        try:
            with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="vps-verify") as pool:
                list(pool.map(self._try_ready, self.shards))
            if self._stop.is_set():
                return  # shutting down: what is left is verified on the next start
            failure = self.failure
            if failure is not None:
                raise ArtifactError(failure)
            self.files.remember()
        finally:
            self.done.set()
        verify_s = round(time.perf_counter() - t0, 4)
        log.info("index shards verified", extra={"shards": len(self.shards), "verify_s": verify_s})

    def stop(self) -> None:
        """Leave the shards not yet started to a search or the next start: the pass ends with those in hand (a
        process exit otherwise waits for the pool to finish every queued shard)."""
        self._stop.set()

    def _try_ready(self, shard: PendingShard) -> None:
        if self._stop.is_set():
            return
        with contextlib.suppress(ShardUnavailable):  # recorded on the shard; `run` reports the first
            shard.ready()
