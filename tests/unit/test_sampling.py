"""SampledWorker: the sample, the bounded queue, and the counts of what was run, dropped and failed."""

from __future__ import annotations

import threading

from app.service.sampling import SampledWorker


class _Counts:
    def __init__(self) -> None:
        self.run: list[int] = []
        self.dropped = 0
        self.failed = 0
        self.gate = threading.Event()
        self.started = threading.Event()

    def handle(self, job: int) -> None:
        self.started.set()
        self.gate.wait(5)
        if job < 0:
            raise RuntimeError("bad job")
        self.run.append(job)

    def drop(self) -> None:
        self.dropped += 1

    def fail(self) -> None:
        self.failed += 1


def test_sample_zero_starts_nothing_and_samples_nothing() -> None:
    c = _Counts()
    worker: SampledWorker[int] = SampledWorker("t", 0.0, 4, c.handle, c.drop, c.fail, seed=0)
    worker.start()
    assert not worker.running and not any(worker.sampled() for _ in range(100))
    worker.stop()


def test_a_full_queue_drops_failures_are_counted_and_stop_drains() -> None:
    c = _Counts()
    worker: SampledWorker[int] = SampledWorker("t", 1.0, 2, c.handle, c.drop, c.fail, seed=0)
    worker.start()
    assert worker.running and worker.sampled()
    worker.put(-1)  # taken by the thread, which waits at the gate
    assert c.started.wait(5)  # the thread holds the first job: the queue is empty
    for job in (1, 2, 3, 4):
        worker.put(job)  # two fit in the queue, two are dropped
    assert c.dropped == 2
    c.gate.set()
    for _ in range(200):
        if len(c.run) == 2:
            break
        threading.Event().wait(0.01)
    assert (c.run, c.failed) == ([1, 2], 1)
    c.gate.clear()
    worker.put(5)  # held at the gate while stop() drains the queue
    worker.put(6)
    worker.put(7)
    threading.Timer(0.2, c.gate.set).start()
    worker.stop(count_queued=True)
    assert not worker.running
    assert len(c.run) + c.dropped == 2 + 2 + 3  # every job run or counted as dropped
