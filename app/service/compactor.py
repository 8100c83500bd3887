"""Automatic compaction: when this process's live delta holds more than `VPS_COMPACT_ABOVE` images, fold the
catalogue into a new index version, one replica at a time (a database lease), then reload it here.

The work runs as a child process (`vps compact`, at a lower CPU priority): the serving path never imports the
build code (the layout test keeps it so), a build's memory is returned to the system when it exits, and a crash
of the build cannot take the server with it. Other processes pick the version up through the CURRENT watch
(`VPS_INDEX_WATCH_S`) or /admin/reload; this one reloads at once. Kubernetes serving pods mount the index
read-only: there `VPS_COMPACT_ABOVE=0` and a `vps compact` Job does it (deploy/kubernetes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess  # nosec B404: runs this package's own CLI with fixed arguments
import sys
import threading
import time
from collections.abc import Callable

from app.catalogue.store import CatalogueStore
from app.engine.search import SearchEngine
from app.errors import CatalogueUnavailable
from app.service.config import Settings
from app.service.metrics import Metrics

log = logging.getLogger(__name__)

LEASE_S = 3600.0  # a compaction that has not finished in an hour is presumed dead and may be retried
TIMEOUT_S = 3000.0  # below the lease: the child is killed before another process may start one
RETRY_S = 60.0  # between two attempts of this process


class AutoCompactor:
    def __init__(self, settings: Settings, store: CatalogueStore, metrics: Metrics, reload: Callable[[], None]) -> None:
        self._settings, self._store, self._metrics, self._reload = settings, store, metrics, reload
        self._running = threading.Lock()
        self._next_at = 0.0  # no new attempt before this (monotonic): a failing build is not retried every sync

    def maybe(self, engine: SearchEngine) -> None:
        """After a sync: start a compaction when the delta is past the threshold and nobody else is compacting."""
        above = self._settings.compact_above
        if above <= 0 or engine.delta.n_items <= above or self._running.locked() or time.monotonic() < self._next_at:
            return
        try:
            if not self._store.take_lease("compaction", LEASE_S):
                return  # another process or replica is compacting
        except CatalogueUnavailable:
            return
        self._running.acquire()
        self._next_at = time.monotonic() + RETRY_S
        threading.Thread(target=self._compact, name="vps-compaction", daemon=True).start()

    def _compact(self) -> None:
        try:
            result = self._run_child()
            self._metrics.compactions.labels(result=result).inc()
            if result == "success":
                self._reload()
        finally:
            with contextlib.suppress(CatalogueUnavailable):  # else it expires on its own
                self._store.release_lease("compaction")
            self._running.release()

    def _run_child(self) -> str:
        s = self._settings
        env = {**os.environ, "VPS_CATALOGUE_URL": s.catalogue_database_url()}  # not on the command line: ps shows it
        cmd = [sys.executable, "-m", "app.cli", "compact", "--out", str(s.index_dir), "--model", str(s.model_dir)]
        log.info("compacting the catalogue", extra={"index_dir": str(s.index_dir)})
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # noqa: S603
        with contextlib.suppress(OSError):  # already gone, or not allowed: it runs at our priority
            os.setpriority(os.PRIO_PROCESS, child.pid, 10)  # searches first: the build takes what they leave
        try:
            stdout, stderr = child.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            log.error("compaction timed out", extra={"timeout_s": TIMEOUT_S})
            return "failed"
        if child.returncode != 0:
            last = (stderr.strip().splitlines() or ["(no output)"])[-1][:500]
            log.error("compaction failed", extra={"exit_code": child.returncode, "error": last})
            return "failed"
        unchanged = "unchanged:" in stdout
        log.info("compaction done", extra={"result": "unchanged" if unchanged else "success"})
        return "unchanged" if unchanged else "success"
