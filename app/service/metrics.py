"""Prometheus metrics, in base units with the `vps_` prefix. One registry per app (no module globals), so
several apps in one process (tests) never collide.

Several worker processes (`vps serve --workers N`): `PROMETHEUS_MULTIPROC_DIR` is set before the workers start,
every process writes its values to files there, and a scrape of any worker aggregates all of them (counters and
histograms summed, dead workers' counts kept; gauges per their `multiprocess_mode`). Files of dead workers'
live gauges are removed at each scrape, so in-flight and version gauges only count living processes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_FILE = re.compile(r"^gauge_live\w+_(\d+)\.db$")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
# Cosine scores lie in -1..1; the demo photos' top hits score 0.61-0.91 (p5-p95, docs/bench/bench_shadow.md) and
# its open-set threshold is 0.79, so the buckets are dense over 0.3-0.95 and coarse elsewhere.
_SCORE_BUCKETS = (-0.5, 0.0, 0.2, *(round(0.3 + 0.05 * i, 2) for i in range(14)), 0.975, 1.0)  # 0.3-0.95 by 0.05
# Outcomes of a shadow search (app/service/shadow.py: compare), routed top-k against the every-shard top-k.
SHADOW_OUTCOMES = ("same", "top1_missed", "topk_missed")
SHARD_STATES = ("verified", "pending", "refused")
CATALOGUE_OPS = ("put_product", "add_images", "delete_image", "delete_product")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._stage_children: dict[str, Histogram] = {}
        self._http(self.registry)
        self._search(self.registry)
        self._index(self.registry)
        self._routing_shadow(self.registry)
        self._catalogue(self.registry)

    def _catalogue(self, r: CollectorRegistry) -> None:
        """Live catalogue changes (app/catalogue/): writes taken here, the delta this process serves, its lag."""
        self.catalogue_changes = Counter(
            "vps_catalogue_changes", "Catalogue writes committed by this service, by operation", ["op"], registry=r
        )
        for op in CATALOGUE_OPS:
            self.catalogue_changes.labels(op=op)
        self.delta_items = Gauge(
            "vps_catalogue_delta_items",
            "Images served from live catalogue changes on top of the index version (compaction folds them in)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.sync_lag = Gauge(
            "vps_catalogue_sync_lag_seconds",
            "Seconds from a catalogue change's commit to this process serving it (the last change applied), or "
            "since the last successful sync while the database is unreachable",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.compactions = Counter(
            "vps_catalogue_compactions",
            "Compactions this process ran (VPS_COMPACT_ABOVE), by result",
            ["result"],
            registry=r,
        )
        for result in ("success", "failed", "unchanged"):
            self.compactions.labels(result=result)
        self.sync_failures = Counter(
            "vps_catalogue_sync_failures", "Catalogue change-log polls that failed", registry=r
        )

    def _http(self, r: CollectorRegistry) -> None:
        # route: the template (/v1/catalogue-images/{version}/{row}), FastAPI's own pages by their path (/docs,
        # /openapi.json), "unmatched" for every path no route matched: bounded, whatever clients send.
        self.requests = Counter(
            "vps_requests", "HTTP requests by route template and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "vps_request_duration_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inflight = Gauge(
            "vps_inflight_requests",
            "Search requests admitted and not finished",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter("vps_rejected", "Requests rejected before work, by reason", ["reason"], registry=r)
        self.admission_wait = Histogram(
            "vps_admission_wait_seconds",
            "Time admitted searches waited for a compute slot (VPS_QUEUE_WAIT_S); those admitted at once are not "
            "observed, those refused after waiting count in vps_rejected_total",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        # Bounded label values exist from the start at 0: rates and alerts work before the first event.
        for reason in ("overloaded", "not_ready"):
            self.rejected.labels(reason=reason)

    def _search(self, r: CollectorRegistry) -> None:
        self.stage_duration = Histogram(
            "vps_stage_duration_seconds",
            "Search pipeline stage latency",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.router_top_probability = Histogram(
            "vps_router_top_probability",
            "Probability of the router's top category",
            buckets=(0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.shards_probed = Histogram(
            "vps_shards_probed",
            "Shards searched per query (chosen by the router, plus those added to fill k)",
            buckets=(1, 2, 3, 4, 5, 8, 16, 32, 64),
            registry=r,
        )
        self.top_score = Histogram(
            "vps_top_score",
            "Cosine score of the best hit of every search that found one (before the open-set threshold)",
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.library_warnings = Counter(
            "vps_library_warnings",
            "Warnings libraries raised while decoding request images (logged once per request, never printed)",
            registry=r,
        )
        self.no_match = Counter(
            "vps_open_set_no_match",
            "Searches answered match=false (no result passed the open-set threshold or min_score)",
            registry=r,
        )
        self.batch_images = Counter("vps_batch_images", "Images received by POST /v1/search/batch", registry=r)
        self.batch_image_errors = Counter(
            "vps_batch_image_errors",
            "Images of a batch answered with their own error entry (the batch answered 200), by error code",
            ["code"],
            registry=r,
        )

    def _index(self, r: CollectorRegistry) -> None:
        self.index_items = Gauge(
            "vps_index_items", "Vectors in the live index", registry=r, multiprocess_mode="livemostrecent"
        )
        self.build_info = Gauge(
            "vps_build_info",
            "Live model and index version (value 1; 0 once replaced)",
            ["model", "index_version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.index_shards = Gauge(
            "vps_index_shards",
            "Shards of the live index by state: verified (hashed and loaded), pending (verified after ready, not yet: "
            "VPS_VERIFY_SHARDS=background), refused (failed verification: searches that need it answer 503)",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        for shard_state in SHARD_STATES:
            self.index_shards.labels(state=shard_state)
        self.index_reloads = Counter("vps_index_reloads", "Index loads by result", ["result"], registry=r)
        for result in ("success", "failed"):
            self.index_reloads.labels(result=result)

    def _routing_shadow(self, r: CollectorRegistry) -> None:
        self.routing_shadow = Counter(
            "vps_routing_shadow",
            "Sampled searches re-run with every shard probed (VPS_SHADOW_SAMPLE), by outcome: same = same top-1 "
            "SKU; top1_missed = the exhaustive top-1 SKU is in the routed answer but not first; topk_missed = it is "
            "not in the routed answer at all",
            ["outcome"],
            registry=r,
        )
        self.routing_shadow_dropped = Counter(
            "vps_routing_shadow_dropped", "Sampled searches not re-run because the shadow queue was full", registry=r
        )
        self.routing_shadow_errors = Counter(
            "vps_routing_shadow_errors", "Shadow searches that failed (logged once, never raised)", registry=r
        )
        for outcome in SHADOW_OUTCOMES:
            self.routing_shadow.labels(outcome=outcome)
        self.captures = Counter(
            "vps_captures",
            "Query photos sampled for capture, by result (stored, dropped, failed)",
            ["result"],
            registry=r,
        )
        for result in ("stored", "dropped", "failed"):
            self.captures.labels(result=result)

    def set_shards(self, verified: int, pending: int, refused: int) -> None:
        for shard_state, n in zip(SHARD_STATES, (verified, pending, refused), strict=True):
            self.index_shards.labels(state=shard_state).set(n)

    def observe_stage(self, stage: str, seconds: float) -> None:
        # The labelled child is looked up once per stage, not once per request (labels() takes a lock).
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_duration.labels(stage=stage)
        child.observe(seconds)

    def exposition(self) -> bytes:
        """The text a scrape gets: this process's registry, or every worker's values in multiprocess mode."""
        directory = os.environ.get(MULTIPROC_ENV)
        if not directory:
            return generate_latest(self.registry)
        sweep_dead_workers(Path(directory))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


def mark_this_process_dead() -> None:
    """At a worker's clean exit: its live gauges (in-flight, versions) stop counting at once."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        multiprocess.mark_process_dead(os.getpid(), directory)  # type: ignore[no-untyped-call]


def sweep_dead_workers(directory: Path) -> None:
    """Drop the live-gauge files of worker processes that no longer exist (crashed or replaced)."""
    for path in directory.glob("gauge_live*.db"):
        m = _LIVE_FILE.match(path.name)
        if m and not _alive(int(m.group(1))):
            multiprocess.mark_process_dead(int(m.group(1)), str(directory))  # type: ignore[no-untyped-call]


# prometheus_client maps each metric file of a process at 1 MiB and grows it; a worker writes about five
# (counters, histograms, gauges by mode). A mapped file that cannot be extended on a full filesystem kills the
# process with SIGBUS, with no log line: so the space is checked once, before any worker starts.
MULTIPROC_BYTES_PER_WORKER = 8 * 1024 * 1024


class MetricsDirError(Exception):
    """The multiprocess metrics directory cannot hold the workers' files; the message names it and why."""


def prepare_multiprocess_dir(directory: Path, workers: int = 1) -> None:
    """Create the directory, empty it of an earlier run's files (stale counts must not be served), and check
    that it is writable with room for every worker's files; MetricsDirError otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for path in directory.glob("*.db"):
            path.unlink()
        probe = directory / f".vps-probe-{os.getpid()}"
        with probe.open("wb") as fh:
            fh.write(b"\0" * 4096)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
        stat = os.statvfs(directory)
    except OSError as exc:
        raise MetricsDirError(
            f"metrics directory {directory} ({MULTIPROC_ENV}) is not writable: {exc.strerror}"
        ) from exc
    free, need = stat.f_bavail * stat.f_frsize, MULTIPROC_BYTES_PER_WORKER * workers
    if free < need:
        raise MetricsDirError(
            f"metrics directory {directory} ({MULTIPROC_ENV}) has {free // 1024} KiB free; "
            f"{workers} worker(s) need {need // 1024} KiB"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
