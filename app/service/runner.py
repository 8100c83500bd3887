"""The one bounded helper that runs blocking work (decode, inference, search) off the event loop, with
admission control in front: when `max_inflight` requests are already admitted, the next is refused at once
(503 + Retry-After) instead of queueing without bound. Work past its deadline answers 503 at once, but keeps its
admission slot until the thread really finishes, so abandoned work cannot pile up behind the limit."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from prometheus_client import Gauge

from app.errors import DeadlineExceeded, Overloaded

T = TypeVar("T")


class BoundedRunner:
    def __init__(self, threads: int, max_inflight: int, gauge: Gauge | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vps-work")
        self._max_inflight = max_inflight
        self._inflight = 0  # only touched on the event loop thread: no lock needed
        self._gauge = gauge  # vps_inflight_requests mirrors the slots taken, abandoned work included

    @property
    def inflight(self) -> int:
        return self._inflight

    def refuse_if_full(self) -> None:
        """Shed load before any work (reading the body included) when every slot is taken."""
        if self._inflight >= self._max_inflight:
            raise Overloaded()

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[Ticket]:
        self.refuse_if_full()
        self._set(self._inflight + 1)
        ticket = Ticket()
        try:
            yield ticket
        finally:
            work = ticket.work
            if work is not None and not work.done():
                work.add_done_callback(lambda _: self._release())  # still running in the pool: keep the slot
            else:
                self._release()

    def _release(self) -> None:
        self._set(self._inflight - 1)

    def _set(self, inflight: int) -> None:
        self._inflight = inflight
        if self._gauge is not None:
            self._gauge.set(inflight)

    async def run(self, ticket: Ticket, timeout_s: float | None, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        work = loop.run_in_executor(self._pool, ctx.run, fn, *args)
        ticket.work = work
        try:
            return await asyncio.wait_for(asyncio.shield(work), timeout_s)
        except TimeoutError:
            work.add_done_callback(_consume_result)
            raise DeadlineExceeded() from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Ticket:
    """An admitted request's slot; `work` is the pool future it waits on, if any."""

    def __init__(self) -> None:
        self.work: asyncio.Future[Any] | None = None


def _consume_result(work: asyncio.Future[Any]) -> None:
    if not work.cancelled():
        work.exception()  # retrieved: an abandoned failure is not reported as "never retrieved"
