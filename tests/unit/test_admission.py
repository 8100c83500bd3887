"""BoundedRunner's bounded wait for a slot: FIFO hand-over, the bound on waiters, the wait limit, the queue closed
for a while after a refusal, and a waiter cancelled (or timed out) just as a slot reaches it never leaks it."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import Overloaded
from app.service.runner import QUEUE_CALM_S, BoundedRunner


async def _hold(runner: BoundedRunner, release: asyncio.Event, order: list[int], i: int, wait_s: float) -> None:
    async with runner.admit(wait_s, max_waiting=8):
        order.append(i)
        await release.wait()


def test_waiters_get_slots_first_come_first_served_and_beyond_the_bound_are_refused() -> None:
    async def scenario() -> list[int]:
        runner = BoundedRunner(threads=1, max_inflight=1)
        release, order = asyncio.Event(), []
        tasks = [asyncio.create_task(_hold(runner, release, order, i, 10.0)) for i in range(4)]
        await asyncio.sleep(0.05)
        assert runner.inflight == 1 and runner.waiting == 3
        runner.refuse_if_full(max_waiting=4)  # one place left: not refused
        with pytest.raises(Overloaded):
            runner.refuse_if_full(max_waiting=3)
        with pytest.raises(Overloaded):
            async with runner.admit(10.0, max_waiting=3):
                pass
        release.set()
        await asyncio.gather(*tasks)
        assert runner.inflight == 0 and runner.waiting == 0
        runner.shutdown()
        return order

    assert asyncio.run(scenario()) == [0, 1, 2, 3]


def test_no_wait_allowed_refuses_at_once() -> None:
    async def scenario() -> None:
        runner = BoundedRunner(threads=1, max_inflight=1)
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(runner, release, [], 0, 0.0))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            async with runner.admit(0.0, max_waiting=8):
                pass
        release.set()
        await holder
        assert runner.inflight == 0
        runner.shutdown()

    asyncio.run(scenario())


def test_a_waiter_timed_out_or_cancelled_gives_its_place_back() -> None:
    async def scenario() -> None:
        now = [0.0]
        runner = BoundedRunner(threads=1, max_inflight=1, clock=lambda: now[0])
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(runner, release, [], 0, 0.0))
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            async with runner.admit(0.05, max_waiting=8):
                pass
        assert runner.waiting == 0
        now[0] += QUEUE_CALM_S  # the refusal closed the queue for a while
        cancelled = asyncio.create_task(_hold(runner, release, [], 1, 10.0))
        await asyncio.sleep(0.01)
        assert runner.waiting == 1
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert runner.waiting == 0
        release.set()
        await holder
        assert runner.inflight == 0
        runner.shutdown()

    asyncio.run(scenario())


def test_a_slot_handed_to_a_waiter_cancelled_in_the_same_turn_passes_on() -> None:
    async def scenario() -> None:
        runner = BoundedRunner(threads=1, max_inflight=1)
        release, order = asyncio.Event(), []
        second: asyncio.Task[None] | None = None

        async def first() -> None:
            async with runner.admit(0.0):
                await release.wait()
            assert second is not None
            second.cancel()  # the slot was just handed to `second`, which has not run since: it must reach `third`

        holder = asyncio.create_task(first())
        await asyncio.sleep(0.01)
        second = asyncio.create_task(_hold(runner, asyncio.Event(), order, 1, 10.0))
        third = asyncio.create_task(_hold(runner, asyncio.Event(), order, 2, 10.0))
        await asyncio.sleep(0.01)
        release.set()
        await holder
        with pytest.raises(asyncio.CancelledError):
            await second
        await asyncio.sleep(0.01)
        assert order == [2] and runner.inflight == 1 and runner.waiting == 0
        third.cancel()
        with pytest.raises(asyncio.CancelledError):
            await third
        assert runner.inflight == 0
        runner.shutdown()

    asyncio.run(scenario())


def test_after_a_refusal_nobody_waits_until_the_queue_has_been_calm_for_a_while() -> None:
    now = [100.0]

    async def scenario() -> None:
        runner = BoundedRunner(threads=1, max_inflight=1, clock=lambda: now[0])
        release = asyncio.Event()
        holder = asyncio.create_task(_hold(runner, release, [], 0, 0.0))
        await asyncio.sleep(0.01)
        runner.refuse_if_full(max_waiting=1)  # calm: a place to wait
        with pytest.raises(Overloaded):
            async with runner.admit(0.0, max_waiting=1):  # refused (no wait allowed): the queue closes
                pass
        with pytest.raises(Overloaded):
            runner.refuse_if_full(max_waiting=1)
        with pytest.raises(Overloaded):
            async with runner.admit(10.0, max_waiting=1):  # refused at once, though it may wait 10 s
                pass
        now[0] += QUEUE_CALM_S  # no refusal for QUEUE_CALM_S: open again
        runner.refuse_if_full(max_waiting=1)
        waiter = asyncio.create_task(_hold(runner, release, [], 1, 10.0))
        await asyncio.sleep(0.01)
        assert runner.waiting == 1
        release.set()
        await asyncio.gather(holder, waiter)
        assert runner.inflight == 0
        runner.shutdown()

    asyncio.run(scenario())
