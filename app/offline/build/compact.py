"""Index versions from the catalogue database: importing a catalogue CSV into it, compaction, pruning.

- `import_catalogue`: `vps build-index --catalogue CSV` with a database (the CLI's default: SQLite in the index
  directory). Each row's bytes are hashed; only images without a stored vector for this model are decoded and
  embedded; products that differ from the database's are replaced (an unchanged catalogue changes nothing), and
  with `full` SKUs the CSV does not name are removed. Then it compacts.
- `compact`: `vps compact`. A new immutable version from the database at one sequence number, every vector read
  from the database (images whose vector is missing for this model, after a model change, are embedded from the
  stored bytes or the images root), published as a build publishes. Nothing new when the live version already
  holds that sequence number with this model.
- `prune`: `vps prune --keep N`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from app.artifacts.manifest import Manifest, earlier_versions, read_manifest, resolve_current
from app.catalogue.store import CatalogueStore, ImageState, ImportImage, ImportProduct, ImportResult, ProductState
from app.engine.delta import catalogue_image_ref, catalogue_image_url
from app.engine.embedding import Embedder, decode_side
from app.errors import ArtifactError, CatalogueError, ServiceError
from app.offline.build.build_index import (
    REFUSED_REPORT,
    BuildOptions,
    BuildResult,
    Coverage,
    check_coverage,
    coverage_of,
    embed_catalogue,
    publish_vectors,
    read_calibration,
)
from app.offline.build.engines import BuildEngine, Embedded, ImageJob, LocalEngine
from app.offline.build.views import catalogue_views
from app.offline.datasets.catalogue import CatalogueRow, RowProblem, read_catalogue
from app.offline.datasets.images import PhotoProblem, decode_photo, read_photo

log = logging.getLogger(__name__)
# One engine call re-embeds at most this many images, or this many bytes of database blobs (API uploads travel
# with their job; CSV imports are read where the engine runs), after a model change: what bounds the blobs held
# in memory at once (up to twice the bytes while the next call's part is read). Each call costs a Ray engine its
# actor pool's start, a part of why whole Ray runs did 0.64-0.83x the local rate (docs/bench/bench_ray_build.md)
# while the second 300 photos ran at 0.93x.
MISSING_PER_CALL = 50_000
MISSING_BYTES_PER_CALL = 512 * 1024 * 1024


@dataclass(frozen=True)
class CompactResult:
    """`built` is None when nothing changed: the live version already holds sequence number `seq`."""

    seq: int
    built: BuildResult | None
    live_version: str | None
    imported: ImportResult | None = None
    coverage: Coverage | None = None  # of the imported CSV
    problems: tuple[RowProblem, ...] = ()
    embedded: int = 0  # images of the imported CSV embedded (the rest had a stored vector for this model)


def import_catalogue(
    catalogue: Path,
    images_root: Path,
    out_dir: Path,
    store: CatalogueStore,
    embedder: Embedder,
    options: BuildOptions,
    *,
    full: bool = False,
    calibration: tuple[np.ndarray, list[CatalogueRow]] | None = None,
    engine: BuildEngine | None = None,
) -> CompactResult:
    """CSV -> (embed what is new, on `engine`) -> database -> compact. Refuses (BuildRefused) before the database
    is touched when products would be lost, as a build does."""
    rows, problems = read_catalogue(catalogue)
    n_unreadable = len(problems)
    model = embedder.card.sha256
    hashed, hash_problems = _hash_rows(rows, images_root, options.threads)
    stored = store.stored_vectors(sorted({r.sha256 for r in hashed}), model)
    fresh = [r for r in hashed if r.sha256 not in stored]
    vectors, embedded, embed_problems = embed_catalogue(fresh, images_root, embedder, options, engine)
    new_vectors = dict(zip((r.sha256 for r in embedded), vectors, strict=True))
    problems = problems + hash_problems + embed_problems
    usable = [r for r in hashed if r.sha256 in stored or r.sha256 in new_vectors]
    coverage = coverage_of(rows, usable, problems, total=len(rows) + n_unreadable)
    check_coverage(coverage, problems, options, out_dir, catalogue, images_root)
    log.info("catalogue embedded", extra={"reused": len(hashed) - len(fresh), "embedded": len(embedded)})
    imported = store.import_products(_products(usable, new_vectors), model, full=full)
    (out_dir / REFUSED_REPORT).unlink(missing_ok=True)  # an earlier refusal no longer describes the catalogue
    result = compact(store, out_dir, embedder, options, images_root=images_root, calibration=calibration, engine=engine)
    return replace(result, imported=imported, coverage=coverage, problems=tuple(problems), embedded=len(embedded))


def compact(
    store: CatalogueStore,
    out_dir: Path,
    embedder: Embedder,
    options: BuildOptions,
    *,
    images_root: Path | None = None,
    calibration: tuple[np.ndarray, list[CatalogueRow]] | None = None,
    force: bool = False,
    engine: BuildEngine | None = None,
) -> CompactResult:
    engine = engine or LocalEngine()
    model = embedder.card.sha256
    live = _live_manifest(out_dir)
    options = _with_live_choices(options, live)
    head = store.head()
    if live is not None and not force and _holds(live, store.catalogue_id(), head, model, options):
        return CompactResult(head, None, live.version)  # decided before reading the catalogue
    if calibration is None and live is not None:
        # A scheduled or automatic compaction has no query photos: the build's, kept in the live version.
        calibration = read_calibration(resolve_current(out_dir), model)
    seq, products = store.snapshot(model)
    rows, vectors = _rows_and_vectors(products, store, embedder, options, images_root, engine)
    if not rows:
        raise CatalogueError(f"{store.url.split('@')[-1]}: the catalogue database holds no product with an image")
    view_rows, view_vectors = add_views(products, store, embedder, options, images_root)
    built = publish_vectors(
        np.vstack(vectors + view_vectors), rows + view_rows, out_dir, embedder, options, calibration=calibration,
        catalogue_seq=seq, catalogue_id=store.catalogue_id(), n_views=len(view_rows), engine=engine,
    )  # fmt: skip
    return CompactResult(seq, built, built.manifest.version)


def _with_live_choices(options: BuildOptions, live: Manifest | None) -> BuildOptions:
    """Build choices left open (None, index_from_live) take the live version's, so a scheduled compaction keeps
    them."""
    if live is not None and options.index_from_live:
        b = live.build
        options = replace(
            options,
            backend=live.backend,
            M=b.M,
            ef_construction=b.ef_construction,
            ef_search=b.ef_search,
            rescore_factor=b.rescore_factor if b.rescore_factor is not None else options.rescore_factor,
        )
    if options.catalogue_views is not None:
        return options
    if live is None:
        return replace(options, catalogue_views=0)
    b = live.build
    return replace(options, catalogue_views=b.catalogue_views, views_max_images=b.views_max_images)


def views_key(model_sha256: str, n: int) -> str:
    """The embeddings-table key of an image's `n` catalogue views under a model: one row holding n vectors. The
    recipe's version is in the key, so a changed recipe never reuses old views."""
    return hashlib.sha256(f"{model_sha256}:catalogue-views-v1:{n}".encode()).hexdigest()


def add_views(
    products: list[ProductState],
    store: CatalogueStore,
    embedder: Embedder,
    options: BuildOptions,
    images_root: Path | None,
) -> tuple[list[CatalogueRow], list[np.ndarray]]:
    """Rows and vectors of the catalogue views of SKUs with few images: stored views are reused, the rest made
    from the image's bytes (seeded by its sha256, so the same image always gets the same views) and stored."""
    n = options.catalogue_views or 0
    few = [p for p in products if 0 < len(p.images) <= options.views_max_images] if n > 0 else []
    if not few:
        return [], []
    key = views_key(embedder.card.sha256, n)
    stored = store.stored_vectors(sorted({img.sha256 for p in few for img in p.images}), key)
    rows: list[CatalogueRow] = []
    vectors: list[np.ndarray] = []
    for p in few:
        for img in p.images:
            views = stored.get(img.sha256)
            if views is None:
                views = _embed_views(img.sha256, img.ref, n, store, embedder, images_root)
                if views is None:  # its image itself is reported (and counted) by the build; only its views go
                    log.warning("catalogue views skipped: image unreadable", extra={"sku": p.sku, "sha256": img.sha256})
                    continue
                store.put_embedding(img.sha256, key, views)
            row = _image_row(p, img)
            rows.extend([row] * n)
            vectors.append(views.reshape(n, -1))
    log.info("catalogue views", extra={"skus": len(few), "vectors": len(rows), "per_image": n})
    return rows, vectors


def _embed_views(
    sha256: str, ref: str | None, n: int, store: CatalogueStore, embedder: Embedder, images_root: Path | None
) -> np.ndarray | None:
    data = _image_bytes(sha256, ref, store, images_root)
    if data is None:
        return None
    try:
        image = decode_photo(data, decode_side(embedder.card.input))
    except (PhotoProblem, ServiceError):
        return None
    rng = np.random.default_rng(int(sha256[:16], 16))
    batch = np.stack([embedder.preprocess(v) for v in catalogue_views(image, n, rng)])
    return embedder.embed(batch).reshape(-1)


def _holds(live: Manifest, catalogue_id: str, seq: int, model: str, options: BuildOptions) -> bool:
    """The live version is what this compaction would build: same database at the same sequence number, same
    model and build choices. Calibration photos are not compared: a scheduled `vps compact` must not rebuild
    (and lose a build's calibration) when nothing changed; `--force` rebuilds anyway."""
    b = live.build
    return (
        live.catalogue_id == catalogue_id
        and live.catalogue_seq == seq
        and live.model.sha256 == model
        and (live.backend, b.M, b.ef_construction, b.ef_search, b.rescore_factor)
        == (options.backend, options.M, options.ef_construction, options.ef_search, options.recorded_rescore_factor())
        and live.router_report.get("kind") == options.router
        and _same_views(b.catalogue_views, b.views_max_images, options)
    )


def _same_views(live_views: int, live_max_images: int, options: BuildOptions) -> bool:
    """Same catalogue views: both without (whatever the image limit says), or the same count and limit."""
    n = options.catalogue_views or 0
    return live_views == n == 0 or (live_views, live_max_images) == (n, options.views_max_images)


def prune(out_dir: Path, keep: int) -> list[str]:
    """Remove earlier index versions beyond the `keep` newest (rollback targets); CURRENT's always stays.
    Returns the removed names. A process still serving a removed version keeps its open files (Linux unlinks)
    until it reloads."""
    removable = earlier_versions(out_dir)[keep:]  # newest first
    for v in removable:
        shutil.rmtree(v)  # read-only files in a writable directory: removable
    return [v.name for v in removable]


def _hash_rows(
    rows: Sequence[CatalogueRow], images_root: Path, threads: int
) -> tuple[list[CatalogueRow], list[RowProblem]]:
    """Each row with the sha256 of its image's bytes (what stored vectors are keyed by), or its problem."""
    root = images_root.resolve()

    def digest(row: CatalogueRow) -> CatalogueRow | RowProblem:
        try:
            return replace(row, sha256=hashlib.sha256(read_photo(root, row.image)).hexdigest())
        except PhotoProblem as exc:
            return RowProblem(row.line, row.image, exc.reason, row.sku)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(digest, rows))
    return [r for r in results if isinstance(r, CatalogueRow)], [r for r in results if isinstance(r, RowProblem)]


def _products(rows: Sequence[CatalogueRow], new_vectors: dict[str, np.ndarray]) -> list[ImportProduct]:
    """Rows grouped by SKU in catalogue order; a SKU's metadata from its first row."""
    grouped: dict[str, list[CatalogueRow]] = {}
    for r in rows:
        grouped.setdefault(r.sku, []).append(r)
    out = []
    for sku, rs in grouped.items():
        first = rs[0]
        images = tuple(ImportImage(r.sha256, r.image, new_vectors.get(r.sha256)) for r in rs)
        out.append(ImportProduct(sku, first.category, first.title or sku, dict(first.attributes), images))
    return out


def _rows_and_vectors(
    products: list[ProductState],
    store: CatalogueStore,
    embedder: Embedder,
    options: BuildOptions,
    images_root: Path | None,
    engine: BuildEngine,
) -> tuple[list[CatalogueRow], list[np.ndarray]]:
    """Every image's row and vector: stored for this model, else (a model change) embedded on `engine` from the
    stored bytes or the images root, and stored."""
    pairs = [(p, img) for p in products for img in p.images]
    missing = [(p, img) for p, img in pairs if img.vector is None]
    fresh, why = _embed_missing(missing, store, embedder, options, images_root, engine)
    rows: list[CatalogueRow] = []
    vectors: list[np.ndarray] = []
    for p, img in pairs:
        vector = img.vector if img.vector is not None else fresh.get(img.image_id)
        if vector is None:
            log.warning(
                "catalogue image left out: no vector for this model",
                extra={"sku": p.sku, "image_id": img.image_id, "reason": why.get(img.image_id, "unknown")},
            )
            continue
        rows.append(_image_row(p, img))
        vectors.append(vector[None])
    return rows, vectors


def _image_row(p: ProductState, img: ImageState) -> CatalogueRow:
    return CatalogueRow(
        line=0,
        sku=p.sku,
        category=p.category,
        image=img.ref or catalogue_image_ref(p.sku, img.image_id),
        title=p.title,
        attributes=p.attributes,
        sha256=img.sha256,
        image_url=catalogue_image_url(p.sku, img.image_id) if img.ref is None else None,
    )


def _image_bytes(sha256: str, ref: str | None, store: CatalogueStore, images_root: Path | None) -> bytes | None:
    """An image's bytes: stored in the database (API uploads), else under the images root (CSV imports)."""
    data = store.blob(sha256)
    if data is None and ref is not None and images_root is not None:
        try:
            data = read_photo(images_root.resolve(), ref)
        except PhotoProblem:
            return None
    return data


def _embed_missing(
    missing: list[tuple[ProductState, ImageState]],
    store: CatalogueStore,
    embedder: Embedder,
    options: BuildOptions,
    images_root: Path | None,
    engine: BuildEngine,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Vectors this model has not stored (a model change), by image id, and why the others have none. Stored as
    they come back."""
    out: dict[str, np.ndarray] = {}
    why: dict[str, str] = {}
    for part in _missing_parts(missing, store, why):
        outcomes = engine.embed_images([j for _, j in part], images_root, embedder, options.stages())
        for (img, _), outcome in zip(part, outcomes, strict=True):
            if not isinstance(outcome, Embedded):
                why[img.image_id] = outcome
            elif outcome.sha256 != img.sha256:  # a file changed under the images root is not the imported image
                why[img.image_id] = "changed_since_import"
            else:
                store.put_embedding(img.sha256, embedder.card.sha256, outcome.vector)
                out[img.image_id] = outcome.vector
    return out, why


def _missing_parts(
    missing: list[tuple[ProductState, ImageState]], store: CatalogueStore, why: dict[str, str]
) -> Iterator[list[tuple[ImageState, ImageJob]]]:
    """The images to re-embed as engine calls, each within MISSING_PER_CALL images and MISSING_BYTES_PER_CALL
    bytes of blobs, read from the database as the parts are made (not all at once)."""
    part: list[tuple[ImageState, ImageJob]] = []
    held = 0
    for _, img in missing:
        job = ImageJob(img.ref or "", store.blob(img.sha256))
        if job.data is None and not job.image:
            why[img.image_id] = "no_bytes"
            continue
        part.append((img, job))
        held += len(job.data or b"")
        if len(part) >= MISSING_PER_CALL or held >= MISSING_BYTES_PER_CALL:
            yield part
            part, held = [], 0
    if part:
        yield part


def _live_manifest(out_dir: Path) -> Manifest | None:
    try:
        return read_manifest(resolve_current(out_dir))
    except (ArtifactError, FileNotFoundError, OSError):
        return None
