"""Assemble one index version into a SearchEngine: verify every file against the manifest, check that model, router and
shards agree, and build the SearchEngine. Anything wrong raises ArtifactError naming the file and both values."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from app.artifacts.attributes import AttributeIndex
from app.artifacts.items import ItemTable
from app.artifacts.manifest import CategoryEntry, IndexFiles, Manifest, read_manifest, resolve_current, safe_join
from app.artifacts.shards import ShardIndex, load_shard
from app.artifacts.verified import VerifiedFiles
from app.engine.embedding import Embedder, OnnxEmbedder
from app.engine.imaging import MAX_DECODE_BYTES, MAX_IMAGE_PIXELS, DecodeBudget
from app.engine.pending import PendingShard, PendingShards
from app.engine.routing import load_router
from app.engine.search import OVERFETCH, SearchEngine, Shard
from app.errors import ArtifactError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineOptions:
    """What an engine needs besides its version's files. The service fills it from its Settings
    (app/service/engines.py); offline jobs use the defaults."""

    ef_search: int | None = None  # None: the build's (manifest)
    max_image_pixels: int = MAX_IMAGE_PIXELS
    overfetch: int = OVERFETCH
    max_decode_bytes: int = MAX_DECODE_BYTES
    decode_budget: DecodeBudget | None = None  # one per process, shared by its engines (reloads keep it)
    verify_records: Path | None = None  # where verified file hashes are remembered (None: hash every time)
    # Shards verified and loaded after the engine exists, each before its first read (app/engine/pending.py);
    # the owner runs `engine.pending` (the service: in the background on a first start).
    defer_shards: bool = False
    intra_op_threads: int = 1
    inter_op_threads: int = 1


def open_index(
    index_dir: Path, model_dir: Path, options: EngineOptions = EngineOptions(), embedder: Embedder | None = None
) -> SearchEngine:
    """The version `index_dir/CURRENT` names, with the model in `model_dir` (or `embedder`, reused)."""
    t0 = time.perf_counter()
    if embedder is None:
        embedder = OnnxEmbedder(
            model_dir, intra_op_threads=options.intra_op_threads, inter_op_threads=options.inter_op_threads
        )
    t_model = time.perf_counter()
    engine = load_version(resolve_current(index_dir), embedder, options)
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


def load_version(version_dir: Path, embedder: Embedder, options: EngineOptions = EngineOptions()) -> SearchEngine:
    manifest = read_manifest(version_dir)
    t0 = time.perf_counter()
    remembered = None
    if options.verify_records is not None:
        remembered = VerifiedFiles(options.verify_records / f"{version_dir.name}.json")
    files = IndexFiles(version_dir, manifest, remembered)  # every file's size, now
    shard_files = {c.shard for c in manifest.categories}
    now = [rel for rel in manifest.files if not (options.defer_shards and rel in shard_files)]
    hashed = files.verify(now)
    verify_s = round(time.perf_counter() - t0, 4)
    log.info(
        "index files verified",
        extra={"files": len(now), "hashed": hashed, "verify_s": verify_s, "deferred": len(manifest.files) - len(now)},
    )
    check_model(version_dir, manifest, embedder)
    router = load_router(safe_join(version_dir, manifest.router))
    if router.dim != embedder.dim:
        raise ArtifactError(f"router {manifest.router}: dim expected {embedder.dim} (model), got {router.dim}")
    names = [c.name for c in manifest.categories]
    if router.categories != names:
        raise ArtifactError(f"router {manifest.router}: categories differ from the manifest's")

    items = ItemTable.load(safe_join(version_dir, manifest.items), safe_join(version_dir, manifest.item_offsets))
    if len(items) != manifest.n_items:
        raise ArtifactError(f"item table: rows expected {manifest.n_items} (manifest), got {len(items)}")

    attributes = AttributeIndex.load(version_dir, manifest.attributes, manifest.n_items, manifest.files.keys())
    ef_search = options.ef_search or manifest.build.ef_search
    pending = PendingShards(files, [pending_shard(files, manifest, c, ef_search) for c in manifest.categories])
    indexes: list[ShardIndex] = list(pending.shards)
    if not options.defer_shards:
        pending.run()  # every file verified and every shard loaded before the engine exists
        indexes = [s.ready() for s in pending.shards]  # the loaded indexes themselves, no proxy in front
    engine = SearchEngine(
        embedder=embedder,
        router=router,
        shards=[
            Shard(c.name, c.offset, index, n_skus=c.n_skus)
            for c, index in zip(manifest.categories, indexes, strict=True)
        ],
        items=items,
        attributes=attributes,
        manifest=manifest,
        max_image_pixels=options.max_image_pixels,
        overfetch=options.overfetch,
        max_decode_bytes=options.max_decode_bytes,
        decode_budget=options.decode_budget,
        ef_search=ef_search,
    )
    engine.pending = pending if options.defer_shards else None
    return engine


def check_model(version_dir: Path, manifest: Manifest, embedder: Embedder) -> None:
    card = embedder.card
    if manifest.model.sha256 != card.sha256:
        raise ArtifactError(
            f"{version_dir / 'manifest.json'}: model sha256 expected {card.sha256} (served model), "
            f"got {manifest.model.sha256} (index was built with another model)"
        )
    if manifest.dim != embedder.dim:
        raise ArtifactError(f"{version_dir / 'manifest.json'}: dim expected {embedder.dim} (model), got {manifest.dim}")


def pending_shard(files: IndexFiles, manifest: Manifest, entry: CategoryEntry, ef_search: int) -> PendingShard:
    """One category's shard, verified and loaded on first use (app/engine/pending.py)."""
    path = files.path(entry.shard)
    if entry.offset + entry.n_vectors > manifest.n_items:
        raise ArtifactError(f"shard {path}: rows {entry.offset}+{entry.n_vectors} exceed the item table")

    def load() -> ShardIndex:
        return load_shard(manifest.backend, path, dim=manifest.dim, ef_search=ef_search)

    return PendingShard(files, entry.shard, manifest.dim, entry.n_vectors, load)
