"""The typed state object the app lifespan owns: settings, metrics, the bounded runner, the shadow sampler and the
live engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from app.catalogue.follow import CatalogueFollower
from app.engine.search import SearchDefaults, SearchEngine
from app.errors import NotReady
from app.service.capture import QueryCapture
from app.service.config import Settings
from app.service.metrics import Metrics
from app.service.runner import BoundedRunner
from app.service.shadow import ShadowSampler

ReloadResult = Literal["success", "failed", "unchanged"]


@dataclass(frozen=True)
class ReloadOutcome:
    result: ReloadResult
    previous_version: str | None
    version: str | None  # live version after the attempt
    reason: str | None = None  # why a version was refused
    load_s: float = 0.0


class Reloader(Protocol):
    """Port: loads the version CURRENT names and swaps it in (app/service/lifecycle.py: IndexReloader)."""

    async def reload(self, *, only_if_changed: bool = False) -> ReloadOutcome: ...


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    runner: BoundedRunner
    shadow: ShadowSampler  # re-runs a sample of searches on every shard, in its own thread (app/service/shadow.py)
    capture: QueryCapture  # keeps a sample of query photos for `vps mine`, in its own thread (app/service/capture.py)
    search_defaults: SearchDefaults  # from the settings, once (app/service/engines.py)
    engine: SearchEngine | None = None
    ready: bool = False
    draining: bool = False  # SIGTERM received: /readyz answers 503 while requests are still served
    load_error: str | None = None
    reloader: Reloader | None = None
    # The catalogue of record and this process's follower of its change log (app/catalogue/follow.py); None
    # only before the lifespan opened it.
    catalogue: CatalogueFollower | None = None

    def require_engine(self) -> SearchEngine:
        if not self.ready or self.engine is None:
            raise NotReady()
        return self.engine
