"""The one bounded helper that runs blocking work (decode, inference, search) off the event loop, with
admission control in front: when `max_inflight` requests are already admitted, the next may wait for a slot for
at most `wait_s`, in a FIFO of at most `max_waiting`, and only if no request was refused in the last
QUEUE_CALM_S: the queue absorbs bursts, while under sustained overload the excess is refused at once (503 +
Retry-After) instead of queueing. Work past its deadline answers 503 at once, but keeps its admission slot until
the thread really finishes, so abandoned work cannot pile up behind the limit."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeVar

from prometheus_client import Gauge, Histogram

from app.errors import DeadlineExceeded, Overloaded

# Measured (scripts/loadtest.py, 2 cores, 2x capacity for 60 s, accepted p99 / unloaded p99): a queue open all
# the time delays every accepted request (2 waiting: 5.4x, 3: 4.4x, none: 2.7x); closed for 1 s after each
# refusal, it stays closed under sustained overload (12 waiting: 2.5x) and still takes bursts (docs/hardening.md).
QUEUE_CALM_S = 1.0

T = TypeVar("T")


class BoundedRunner:
    def __init__(
        self,
        threads: int,
        max_inflight: int,
        gauge: Gauge | None = None,
        clock: Callable[[], float] = time.monotonic,
        waits: Histogram | None = None,
    ) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vps-work")
        self._max_inflight = max_inflight
        self._inflight = 0  # only touched on the event loop thread: no lock needed
        self._gauge = gauge  # vps_inflight_requests mirrors the slots taken, abandoned work included
        self._waits = waits  # vps_admission_wait_seconds: how long admitted requests waited in the queue
        # Requests waiting for a slot, first come first served; a freed slot passes to the first of them.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._clock = clock
        self._refused_at = -QUEUE_CALM_S  # the last refusal (clock time)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def refuse_if_full(self, max_waiting: int = 0) -> None:
        """Shed load before any work (reading the body included) when every slot and every place to wait for
        one are taken."""
        if self._inflight >= self._max_inflight and not self._may_wait(max_waiting):
            self._refuse()

    @asynccontextmanager
    async def admit(self, wait_s: float = 0.0, max_waiting: int = 0) -> AsyncIterator[Ticket]:
        """A slot for one request: at once when one is free, else after waiting at most `wait_s` behind at most
        `max_waiting - 1` others when the queue is open; Overloaded otherwise."""
        if self._inflight < self._max_inflight and not self._waiting:
            self._set(self._inflight + 1)
        elif wait_s <= 0 or not self._may_wait(max_waiting):
            self._refuse()
        else:
            t0 = self._clock()
            await self._wait_for_slot(wait_s)
            if self._waits is not None:
                self._waits.observe(self._clock() - t0)
        ticket = Ticket()
        try:
            yield ticket
        finally:
            work = ticket.work
            if work is not None and not work.done():
                work.add_done_callback(lambda _: self._release())  # still running in the pool: keep the slot
            else:
                self._release()

    async def _wait_for_slot(self, wait_s: float) -> None:
        """Returns holding a slot passed on by `_release`, or raises Overloaded after `wait_s`."""
        slot = asyncio.get_running_loop().create_future()
        self._waiting.append(slot)
        try:
            async with asyncio.timeout(wait_s):
                await slot
        except TimeoutError:
            if not slot.done() or slot.cancelled():
                self._refuse()
            # Passed a slot as the time ran out: keep it.
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                self._release()  # the client went away holding a slot: pass it on
            raise
        finally:
            if slot in self._waiting:
                self._waiting.remove(slot)

    def _may_wait(self, max_waiting: int) -> bool:
        return len(self._waiting) < max_waiting and self._clock() - self._refused_at >= QUEUE_CALM_S

    def _refuse(self) -> NoReturn:
        self._refused_at = self._clock()
        raise Overloaded()

    def _release(self) -> None:
        while self._waiting:
            slot = self._waiting.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes on: inflight is unchanged
                return
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

    def take_free(self, n: int) -> int:
        """Up to `n` more slots for an admitted request, only those free now with nobody waiting for one: a batch
        runs wider on an idle service, never past the admission limit. Returns how many were taken; they go back
        with `run_parts`."""
        taken = 0
        while taken < n and self._inflight < self._max_inflight and not self._waiting:
            self._set(self._inflight + 1)
            taken += 1
        return taken

    async def run_parts(
        self,
        ticket: Ticket,
        timeout_s: float | None,
        fn: Callable[..., T],
        parts: list[tuple[object, ...]],
        extra_slots: int = 0,
    ) -> list[T]:
        """`fn(*part)` for every part at once on the pool (a batch: its parts side by side), under the ticket's
        slot and `extra_slots` taken with `take_free`. Every slot is held until every part has finished, also
        after a deadline or a part's failure (the first failure is raised once all are done)."""
        loop = asyncio.get_running_loop()
        works = [loop.run_in_executor(self._pool, contextvars.copy_context().run, fn, *p) for p in parts]
        work = asyncio.gather(*works, return_exceptions=True)
        ticket.work = work
        for _ in range(extra_slots):
            work.add_done_callback(lambda _: self._release())
        try:
            results = await asyncio.wait_for(asyncio.shield(work), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded() from None
        out: list[T] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            out.append(r)
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class Ticket:
    """An admitted request's slot; `work` is the pool future it waits on, if any."""

    def __init__(self) -> None:
        self.work: asyncio.Future[Any] | None = None


def _consume_result(work: asyncio.Future[Any]) -> None:
    if not work.cancelled():
        work.exception()  # retrieved: an abandoned failure is not reported as "never retrieved"
