"""A random sample of requests handed to one daemon thread through a bounded queue: the shape the shadow searches
(app/service/shadow.py) and query capture (app/service/capture.py) share.

On the request path a sampled request costs one random draw and a `put_nowait`; a full queue drops the job (the
owner counts it), a failing job is the owner's to count, and nothing it does can slow or fail the request."""

from __future__ import annotations

import contextlib
import queue
import random
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

J = TypeVar("J")


class SampledWorker(Generic[J]):
    """`start()` after load, `sampled()` and `put()` per request on the event loop, `stop()` at shutdown. With
    `sample == 0` no thread is started and `sampled()` is always false."""

    def __init__(
        self,
        name: str,
        sample: float,
        queue_size: int,
        handle: Callable[[J], None],
        on_drop: Callable[[], None],
        on_error: Callable[[], None],
        *,
        seed: int | None = None,
    ) -> None:
        self.name, self.sample = name, sample
        self._handle, self._on_drop, self._on_error = handle, on_drop, on_error
        # Its own generator: no shared global state; one C call per request.
        self._draw = random.Random(seed).random  # noqa: S311 (sampling, not security)
        self._queue: queue.Queue[J | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._count_queued = False

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, first: Callable[[], object] | None = None) -> None:
        """Start the thread (`first` runs on it before any job) unless sampling is off or it already runs."""
        if self.sample <= 0 or self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, args=(first,), name=self.name, daemon=True)
        self._thread.start()

    def sampled(self) -> bool:
        return self._thread is not None and self._draw() < self.sample

    def put(self, job: J) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._on_drop()

    def stop(self, timeout_s: float = 5.0, *, count_queued: bool = False) -> None:
        """Jobs still queued are dropped, not run (counted as drops with `count_queued`): shutdown waits for one
        job at most."""
        thread = self._thread
        if thread is None:
            return
        self._count_queued = count_queued
        self._stopping.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
                if count_queued:
                    self._on_drop()
        # Only the event loop puts (offers and this): just emptied, so this does not wait; never raise at shutdown.
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout_s)
        thread.join(timeout_s)
        self._thread = None

    def _run(self, first: Callable[[], object] | None) -> None:
        if first is not None:
            with contextlib.suppress(Exception):
                first()
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._stopping.is_set():
                if self._count_queued:  # taken from the queue after stop() began: dropped, as the drain drops
                    self._on_drop()
                continue
            try:
                self._handle(job)
            except Exception:
                self._on_error()
