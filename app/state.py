"""The typed state object the app lifespan owns: settings, metrics, the bounded runner, the shadow sampler and the
live engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.config import Settings
from app.errors import NotReady
from app.metrics import Metrics
from app.runner import BoundedRunner
from app.search import SearchEngine
from app.shadow import ShadowSampler

if TYPE_CHECKING:
    from app.lifecycle import IndexReloader


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    runner: BoundedRunner
    shadow: ShadowSampler  # re-runs a sample of searches on every shard, in its own thread (app/shadow.py)
    engine: SearchEngine | None = None
    ready: bool = False
    draining: bool = False  # SIGTERM received: /readyz answers 503 while requests are still served
    load_error: str | None = None
    reloader: IndexReloader | None = None

    def require_engine(self) -> SearchEngine:
        if not self.ready or self.engine is None:
            raise NotReady()
        return self.engine
