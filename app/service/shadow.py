"""Shadow recall: how often routing loses a product that searching every shard finds, measured on live traffic.

A sample of routed searches (`VPS_SHADOW_SAMPLE`) is searched again with every shard probed, off the request
path: the request only draws a random number and, when sampled, puts its query vector in a bounded queue
(`VPS_SHADOW_QUEUE`) and returns. One daemon thread of its own drains the queue (never the request pool, so it
never takes a compute slot), compares the routed SKUs with the exhaustive ones and counts the outcome in
`vps_routing_shadow_total{outcome}`. A full queue drops the sample (`vps_routing_shadow_dropped_total`); a
failure is counted (`vps_routing_shadow_errors_total`) and logged once, never raised.

Skipped, since there is nothing to learn: a forced category (nothing was routed) and a routed search whose probes
and fill already covered every shard. A sample keeps a reference to the engine its query ran on, so a reload
swapping engines meanwhile does not compare two index versions.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.engine.search import SearchEngine, SearchOutcome, SearchParams, every_shard
from app.service.metrics import SHADOW_OUTCOMES, Metrics
from app.service.sampling import SampledWorker

log = logging.getLogger(__name__)

ShadowOutcome = Literal["same", "top1_missed", "topk_missed"]


def compare(routed: Sequence[str], exhaustive: Sequence[str]) -> ShadowOutcome:
    """Where the every-shard search's best SKU is in the routed answer (mutually exclusive outcomes):

    - `same`: it is the routed top-1;
    - `top1_missed`: it is in the routed answer, but not first (routing demoted it);
    - `topk_missed`: it is not in the routed answer at all (routing hid the best match).

    The rest of the lists is not compared: filling k takes the next shards by router probability, the every-shard
    search the next SKUs by score, so below the top they differ by design (on the demo at k=10, a whole-list rule
    flagged 3,890 of 3,890 samples). An empty exhaustive answer (open set, min_score) loses nothing: `same`."""
    if not exhaustive or (routed and routed[0] == exhaustive[0]):
        return "same"
    return "top1_missed" if exhaustive[0] in routed else "topk_missed"


@dataclass(frozen=True)
class ShadowJob:
    engine: SearchEngine  # the engine the query ran on, not whatever is live when the job runs
    vector: np.ndarray
    params: SearchParams
    routed: tuple[str, ...]


class ShadowSampler:
    """Owned by the app's lifespan: `start()` after load, `offer()` per search on the event loop, `stop()` at
    shutdown. With `sample == 0` no thread is started and `offer()` returns at once."""

    def __init__(self, sample: float, queue_size: int, metrics: Metrics, *, seed: int | None = None) -> None:
        self._outcomes = {o: metrics.routing_shadow.labels(outcome=o) for o in SHADOW_OUTCOMES}
        self._errors = metrics.routing_shadow_errors
        self._worker: SampledWorker[ShadowJob] = SampledWorker(
            "vps-shadow", sample, queue_size, self._search, metrics.routing_shadow_dropped.inc, self._failed, seed=seed
        )
        self._logged = False

    @property
    def sample(self) -> float:
        return self._worker.sample

    @property
    def running(self) -> bool:
        return self._worker.running

    def start(self) -> None:
        self._worker.start()

    def offer(self, engine: SearchEngine, params: SearchParams, outcome: SearchOutcome) -> None:
        """On the request path: cheap, never blocks, never raises."""
        if not self._worker.sampled():
            return
        try:
            if outcome.forced_category or outcome.vector is None or params.offset:
                return  # a page past the first is compared with nothing: the exhaustive ranking's top is not it
            if len(outcome.probes) + len(outcome.added) >= len(engine.shards):
                return  # the routed search already was exhaustive
            if engine.pending is not None and engine.pending.failure is not None:
                return  # a shard was refused: an every-shard search would fail, and /readyz already says so
            routed = tuple(str(h.item["sku"]) for h in outcome.results)
            self._worker.put(ShadowJob(engine, outcome.vector, params, routed))
        except Exception:
            self._failed()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Samples still queued are dropped, not searched: shutdown waits for one shadow search at most."""
        self._worker.stop(timeout_s)

    def _search(self, job: ShadowJob) -> None:
        self._outcomes[self.run(job)].inc()

    @staticmethod
    def run(job: ShadowJob) -> ShadowOutcome:
        """The job's query searched with every shard probed (probe_mass 1 takes every shard up to max_probes),
        compared with what the routed search answered."""
        engine = job.engine
        params = dataclasses.replace(every_shard(job.params, len(engine.shards)), explain=False)
        exhaustive = engine.search_vector(job.vector, params)
        return compare(job.routed, [str(h.item["sku"]) for h in exhaustive.results])

    def _failed(self) -> None:
        self._errors.inc()
        if not self._logged:  # a broken shadow path must not flood the logs: the counter keeps counting
            self._logged = True
            log.exception("shadow search failed; further failures are only counted")
