"""The service's engine loader: its Settings mapped onto the engine's options (the one place that does)."""

from __future__ import annotations

import logging
import time

from app.artifacts.manifest import earlier_versions
from app.engine.assemble import EngineOptions, load_version, open_index
from app.engine.batching import MicroBatcher
from app.engine.embedding import Embedder, OnnxEmbedder
from app.engine.imaging import DecodeBudget
from app.engine.search import SearchDefaults, SearchEngine
from app.errors import ArtifactError
from app.service.config import Settings

log = logging.getLogger(__name__)


def engine_options(settings: Settings) -> EngineOptions:
    records = None
    if settings.remember_verification:
        records = settings.verify_cache_dir or settings.index_dir / ".verified"
    return EngineOptions(
        ef_search=settings.ef_search,
        max_image_pixels=settings.max_image_pixels,
        overfetch=settings.overfetch,
        max_decode_bytes=settings.max_decode_bytes,
        decode_budget=DecodeBudget(settings.decode_budget_bytes),
        verify_records=records,
        # A corrupt shard found after start cannot fall back to an earlier version: with the fallback on, verify first.
        defer_shards=settings.verify_shards == "background" and not settings.fallback_to_previous,
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
    """The version CURRENT names under the configured index directory (the model reused when given). When it is
    refused and `fallback_to_previous` is set, the newest earlier version that verifies instead."""
    options = engine_options(settings)
    if embedder is None:
        t0 = time.perf_counter()
        embedder = OnnxEmbedder(
            settings.model_dir, intra_op_threads=options.intra_op_threads, inter_op_threads=options.inter_op_threads
        )
        # open_index's "index loaded" line times only a model it opens itself: this one's time is said here.
        model_load_s = round(time.perf_counter() - t0, 4)
        log.info("model loaded", extra={"model": embedder.card.name, "model_load_s": model_load_s})
        if settings.micro_batch_window_ms > 0:
            embedder = MicroBatcher(embedder, settings.micro_batch_window_ms / 1000, settings.micro_batch_max_images)
    try:
        return open_index(settings.index_dir, settings.model_dir, options, embedder)
    except ArtifactError as refused:
        if not settings.fallback_to_previous:
            raise
        for version_dir in earlier_versions(settings.index_dir):
            try:
                engine = load_version(version_dir, embedder, options)
            except ArtifactError as exc:
                log.warning("earlier index version refused too: %s", exc)
                continue
            log.warning(
                "CURRENT's index version refused; serving the newest earlier version that verifies: %s",
                refused,
                extra={"index_version": engine.manifest.version},
            )
            return engine
        raise
