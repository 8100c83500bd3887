"""The typed state object the app lifespan owns: settings, metrics, the bounded runner and the live engine."""

from __future__ import annotations

from dataclasses import dataclass

from app.config import Settings
from app.errors import NotReady
from app.metrics import Metrics
from app.runner import BoundedRunner
from app.search import SearchEngine


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    runner: BoundedRunner
    engine: SearchEngine | None = None
    ready: bool = False
    load_error: str | None = None

    def require_engine(self) -> SearchEngine:
        if not self.ready or self.engine is None:
            raise NotReady()
        return self.engine
