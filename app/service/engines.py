"""The service's engine loader: its Settings mapped onto the engine's options (the one place that does)."""

from __future__ import annotations

from app.engine.assemble import EngineOptions, open_index
from app.engine.embedding import Embedder
from app.engine.search import SearchDefaults, SearchEngine
from app.service.config import Settings


def engine_options(settings: Settings) -> EngineOptions:
    records = None
    if settings.remember_verification:
        records = settings.verify_cache_dir or settings.index_dir / ".verified"
    return EngineOptions(
        ef_search=settings.ef_search,
        max_image_pixels=settings.max_image_pixels,
        overfetch=settings.overfetch,
        verify_records=records,
        intra_op_threads=settings.ort_intra_op_threads,
        inter_op_threads=settings.ort_inter_op_threads,
    )


def search_defaults(settings: Settings) -> SearchDefaults:
    return SearchDefaults(
        k=settings.default_k,
        probe_mass=settings.probe_mass,
        max_probes=settings.max_probes,
        open_set=settings.open_set,
        fill_max_probes=settings.fill_max_probes,
    )


def load_engine(settings: Settings, embedder: Embedder | None = None) -> SearchEngine:
    """The version CURRENT names under the configured index directory (the model reused when given)."""
    return open_index(settings.index_dir, settings.model_dir, engine_options(settings), embedder)
