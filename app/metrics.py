"""Prometheus metrics, in base units with the `vps_` prefix. One registry per app (no module globals), so
several apps in one process (tests) never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
_STAGE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vps_requests", "HTTP requests by route template and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "vps_request_duration_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.stage_duration = Histogram(
            "vps_stage_duration_seconds",
            "Search pipeline stage latency",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("vps_inflight_requests", "Search requests admitted and not finished", registry=r)
        self.rejected = Counter("vps_rejected", "Requests rejected before work, by reason", ["reason"], registry=r)
        self.router_top_probability = Histogram(
            "vps_router_top_probability",
            "Probability of the router's top category",
            buckets=(0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0),
            registry=r,
        )
        self.shards_probed = Histogram(
            "vps_shards_probed", "Shards searched per query", buckets=(1, 2, 3, 4, 5, 8, 16, 32, 64), registry=r
        )
        self.index_items = Gauge("vps_index_items", "Vectors in the live index", registry=r)
        self.build_info = Gauge(
            "vps_build_info", "Live model and index version (value 1)", ["model", "index_version"], registry=r
        )
        self.index_reloads = Counter("vps_index_reloads", "Index loads by result", ["result"], registry=r)
