"""Load one index version for serving: verify every file against the manifest, check that model, router and
shards agree, and build the SearchEngine. Anything wrong raises ArtifactError naming the file and both values."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from app.config import Settings
from app.embedding import Embedder, OnnxEmbedder
from app.errors import ArtifactError
from app.index.items import ItemTable
from app.index.manifest import read_manifest, resolve_current, safe_join, verify_files
from app.index.shards import load_shard
from app.index.verified import VerifiedFiles
from app.router import load_router
from app.search import SearchEngine, Shard

log = logging.getLogger(__name__)


def load_engine(settings: Settings, embedder: Embedder | None = None) -> SearchEngine:
    t0 = time.perf_counter()
    if embedder is None:
        embedder = OnnxEmbedder(
            settings.model_dir,
            intra_op_threads=settings.ort_intra_op_threads,
            inter_op_threads=settings.ort_inter_op_threads,
        )
    t_model = time.perf_counter()
    version_dir = resolve_current(settings.index_dir)
    engine = load_version(version_dir, embedder, settings)
    t_index = time.perf_counter()
    # Start-up split in two: what the model costs and what the index's size costs (docs/benchmarks.md).
    log.info(
        "index loaded",
        extra={
            "index_version": engine.manifest.version,
            "items": engine.manifest.n_items,
            "shards": len(engine.shards),
            "model_load_s": round(t_model - t0, 4),
            "index_load_s": round(t_index - t_model, 4),
            "load_s": round(t_index - t0, 4),
        },
    )
    return engine


def load_version(version_dir: Path, embedder: Embedder, settings: Settings) -> SearchEngine:
    manifest = read_manifest(version_dir)
    t0 = time.perf_counter()
    remembered = None
    if settings.remember_verification:
        record_dir = settings.verify_cache_dir or settings.index_dir / ".verified"
        remembered = VerifiedFiles(record_dir / f"{version_dir.name}.json")
    hashed = verify_files(version_dir, manifest, remembered)
    verify_s = round(time.perf_counter() - t0, 4)
    log.info("index files verified", extra={"files": len(manifest.files), "hashed": hashed, "verify_s": verify_s})

    card = embedder.card
    if manifest.model.sha256 != card.sha256:
        raise ArtifactError(
            f"{version_dir / 'manifest.json'}: model sha256 expected {card.sha256} (served model), "
            f"got {manifest.model.sha256} (index was built with another model)"
        )
    if manifest.dim != embedder.dim:
        raise ArtifactError(f"{version_dir / 'manifest.json'}: dim expected {embedder.dim} (model), got {manifest.dim}")

    router = load_router(safe_join(version_dir, manifest.router))
    if router.dim != embedder.dim:
        raise ArtifactError(f"router {manifest.router}: dim expected {embedder.dim} (model), got {router.dim}")
    names = [c.name for c in manifest.categories]
    if router.categories != names:
        raise ArtifactError(f"router {manifest.router}: categories differ from the manifest's")

    items = ItemTable.load(safe_join(version_dir, manifest.items), safe_join(version_dir, manifest.item_offsets))
    if len(items) != manifest.n_items:
        raise ArtifactError(f"item table: rows expected {manifest.n_items} (manifest), got {len(items)}")

    shards: list[Shard] = []
    for entry in manifest.categories:
        path = safe_join(version_dir, entry.shard)
        index = load_shard(
            manifest.backend, path, dim=manifest.dim, ef_search=settings.ef_search or manifest.build.ef_search
        )
        if index.ntotal != entry.n_vectors:
            raise ArtifactError(f"shard {path}: vectors expected {entry.n_vectors} (manifest), got {index.ntotal}")
        if entry.offset + entry.n_vectors > manifest.n_items:
            raise ArtifactError(f"shard {path}: rows {entry.offset}+{entry.n_vectors} exceed the item table")
        shards.append(Shard(entry.name, entry.offset, index, n_skus=entry.n_skus))

    return SearchEngine(
        embedder=embedder,
        router=router,
        shards=shards,
        items=items,
        manifest=manifest,
        max_image_pixels=settings.max_image_pixels,
        overfetch=settings.overfetch,
    )
