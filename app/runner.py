"""The one bounded helper that runs blocking work (decode, inference, search) off the event loop, with
admission control in front: when `max_inflight` requests are already admitted, the next is refused at once
(503 + Retry-After) instead of queueing without bound."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from app.errors import Overloaded

T = TypeVar("T")


class BoundedRunner:
    def __init__(self, threads: int, max_inflight: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vps-work")
        self._max_inflight = max_inflight
        self._inflight = 0  # only touched on the event loop thread: no lock needed

    @property
    def inflight(self) -> int:
        return self._inflight

    @asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        if self._inflight >= self._max_inflight:
            raise Overloaded()
        self._inflight += 1
        try:
            yield
        finally:
            self._inflight -= 1

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        return await loop.run_in_executor(self._pool, ctx.run, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
