"""`vps build-index`: embed a catalogue, build one HNSW shard per category, fit the router, write an immutable
version directory with its manifest, then point CURRENT at it atomically.

Unreadable images are reported by path and reason and counted in the manifest: never silently dropped. A build
that would lose a SKU (every image of it failed) or more images than allowed publishes nothing: it raises
BuildRefused, writes its report beside the versions and leaves CURRENT alone."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from app.artifacts.attributes import AttributeIndex
from app.artifacts.hashing import sha256_file
from app.artifacts.items import ItemTable
from app.artifacts.manifest import (
    DEFAULT_RESCORE_FACTOR,
    FORMAT_VERSION,
    Backend,
    BuildParams,
    CategoryEntry,
    FileEntry,
    Manifest,
    ModelRef,
    make_read_only,
    publish_current,
    write_manifest,
)
from app.artifacts.shards import SHARD_SUFFIX
from app.engine.embedding import Embedder, OnnxEmbedder
from app.errors import BuildRefused, CatalogueError
from app.offline.build.engines import BuildEngine, ImageJob, LocalEngine, ShardJob, StageOptions
from app.offline.datasets.catalogue import CatalogueRow, RowProblem, read_catalogue
from app.offline.routing.calibrate import (
    EXHAUSTIVE_BELOW_VECTORS,
    NEAR_DUPLICATE_COSINE,
    Calibration,
    RouterReport,
    train_router,
)
from app.offline.routing.fit import RouterKind, class_centroids

log = logging.getLogger(__name__)

# A refused build's report: beside the versions (never inside one: nothing is published); the latest refusal only,
# removed by the next build that publishes.
REFUSED_REPORT = "refused-build-report.json"
LOST_SKUS_NAMED = 10  # SKUs named in a refusal's message; the report lists all of them


@dataclass(frozen=True)
class Limit:
    """How many of something a build may lose: at most `count` of them, or at most `fraction` of the total."""

    count: int | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> Limit:
        """`3` is a count; `0.01`, `1.0` and `5%` are fractions (a decimal point or % makes a fraction)."""
        t = text.strip()
        try:
            if t.endswith("%"):
                value = float(t[:-1]) / 100
            elif any(c in t for c in ".eE"):
                value = float(t)
            else:
                count = int(t)
                if count < 0:
                    raise ValueError(t)
                return cls(count=count)
        except ValueError:
            raise ValueError(f"{text!r} is neither a count (3) nor a fraction (0.01, 5%)") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{text!r}: a fraction lies between 0 and 1")
        return cls(fraction=value)

    def exceeded(self, n: int, total: int) -> bool:
        if self.count is not None:
            return n > self.count
        return n > (self.fraction or 0.0) * total

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.fraction:g}"


@dataclass(frozen=True)
class Coverage:
    """How much of the catalogue the index holds. A SKU is lost when every one of its rows failed."""

    images_total: int
    images_indexed: int
    skus_total: int
    lost_skus: tuple[str, ...] = ()

    @property
    def images_failed(self) -> int:
        return self.images_total - self.images_indexed

    @property
    def skus_indexed(self) -> int:
        return self.skus_total - len(self.lost_skus)

    def summary(self) -> str:
        return f"{self.images_indexed} of {self.images_total} images and {self.skus_indexed} of {self.skus_total} SKUs"

    def report(self, problems: Sequence[RowProblem]) -> dict[str, Any]:
        return {
            "images_total": self.images_total,
            "images_embedded": self.images_indexed,
            "skus_total": self.skus_total,
            "skus_indexed": self.skus_indexed,
            "lost_skus": list(self.lost_skus),
            "problems": [p.__dict__ for p in problems],
        }


@dataclass(frozen=True)
class BuildOptions:
    backend: Backend = "faiss"
    rescore_factor: int = DEFAULT_RESCORE_FACTOR  # faiss-sq8 only
    # Compaction: backend, M, efConstruction, efSearch and rescore factor as the live version was built (a
    # scheduled or automatic `vps compact` names none of them).
    index_from_live: bool = False
    M: int = 32
    ef_construction: int = 200
    ef_search: int = 64
    batch_size: int = 32
    threads: int = 2
    # Router and probing: probe_mass is chosen by measurement (app/offline/routing/calibrate.py).
    max_probes: int = 8
    max_routing_loss: float = 0.005
    router_min_images: int = 5
    router: RouterKind = "prototype"
    target_precision: float = 0.9
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE
    exhaustive_below: int = EXHAUSTIVE_BELOW_VECTORS  # vectors: an index this small is searched whole
    # Losses beyond these refuse the build (BuildRefused): a few unreadable photos are normal in a large
    # catalogue, a product that vanishes from search is not.
    max_failed_images: Limit = Limit(fraction=0.01)
    max_lost_skus: Limit = Limit(count=0)
    progress: bool = True
    # Catalogue-side augmentation (app/offline/build/views.py), applied by compaction: `catalogue_views` augmented
    # views of each image of a SKU with at most `views_max_images` images, stored as more vectors of that SKU.
    # None: as the live version was built (a scheduled `vps compact` keeps the build's choice); 0: none.
    catalogue_views: int | None = 0
    views_max_images: int = 2

    def recorded_rescore_factor(self) -> int | None:
        """As the manifest records it: only compressed shards re-score."""
        return self.rescore_factor if self.backend == "faiss-sq8" else None

    def stages(self) -> StageOptions:
        return StageOptions(
            batch_size=self.batch_size,
            threads=self.threads,
            backend=self.backend,
            M=self.M,
            ef_construction=self.ef_construction,
            rescore_factor=self.rescore_factor,
            progress=self.progress,
        )


@dataclass(frozen=True)
class BuildResult:
    version_dir: Path
    manifest: Manifest
    problems: list[RowProblem]
    coverage: Coverage

    @property
    def router_report(self) -> RouterReport:
        return RouterReport(**self.manifest.router_report)


def embed_catalogue(
    rows: Sequence[CatalogueRow],
    images_root: Path,
    embedder: Embedder,
    options: BuildOptions,
    engine: BuildEngine | None = None,
) -> tuple[np.ndarray, list[CatalogueRow], list[RowProblem]]:
    """Embed every row's image (on `engine`, default this process). Returns vectors for the rows that worked,
    those rows (with their images' sha256), and the problems."""
    outcomes = (engine or LocalEngine()).embed_images(
        [ImageJob(r.image) for r in rows], images_root, embedder, options.stages()
    )
    vectors: list[np.ndarray] = []
    kept: list[CatalogueRow] = []
    problems: list[RowProblem] = []
    for row, outcome in zip(rows, outcomes, strict=True):
        if isinstance(outcome, str):
            problems.append(RowProblem(row.line, row.image, outcome, row.sku))
            log.warning("image skipped", extra={"image": row.image, "line": row.line, "reason": outcome})
        else:
            vectors.append(outcome.vector)
            kept.append(replace(row, sha256=outcome.sha256))
    empty = np.empty((0, embedder.dim), np.float32)
    return (np.stack(vectors).astype(np.float32, copy=False) if vectors else empty), kept, problems


def assign_clusters(vectors: np.ndarray, rows: list[CatalogueRow]) -> tuple[list[CatalogueRow], int]:
    """Categories for a catalogue without them: spherical k-means over SKU mean embeddings (a SKU never spans
    two shards). k is the candidate with the best silhouette score; it is recorded in the router report."""
    skus = sorted({r.sku for r in rows})
    sku_index = {s: i for i, s in enumerate(skus)}
    labels = np.asarray([sku_index[r.sku] for r in rows])
    means = class_centroids(vectors, labels, len(skus))
    candidates = [k for k in (2, 4, 8, 16, 32, 64, 128, 256) if k <= max(2, len(skus) // 3)]
    best_k, best_score, best_assign = 1, -np.inf, np.zeros(len(skus), dtype=np.int64)
    for k in candidates:
        km = faiss.Kmeans(means.shape[1], k, niter=25, seed=0, spherical=True, min_points_per_centroid=1)
        km.train(np.ascontiguousarray(means, dtype=np.float32))
        assign = km.index.search(np.ascontiguousarray(means, dtype=np.float32), 1)[1][:, 0]
        score = _silhouette(means, assign)
        if score > best_score:
            best_k, best_score, best_assign = k, score, assign
    named = [replace(r, category=f"cluster-{int(best_assign[sku_index[r.sku]]):03d}") for r in rows]
    return named, best_k


def _silhouette(x: np.ndarray, assign: np.ndarray) -> float:
    """Mean silhouette with cosine distance (exact; SKU counts are small enough)."""
    d = 1.0 - x @ x.T
    clusters = np.unique(assign)
    if len(clusters) < 2:
        return -1.0
    scores = []
    for i in range(len(x)):
        own = assign == assign[i]
        if own.sum() <= 1:
            scores.append(0.0)
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, assign == c].mean() for c in clusters if c != assign[i])
        scores.append((b - a) / max(a, b, 1e-12))
    return float(np.mean(scores))


def _calibration_set(
    calibration: tuple[np.ndarray, list[CatalogueRow]] | None,
    rows: list[CatalogueRow],
    cat_index: dict[str, int],
    training: frozenset[str],
) -> Calibration | None:
    """Keep the calibration queries whose SKU is in the catalogue; their category is the catalogue's (so it also
    works when the build clustered the categories)."""
    if calibration is None:
        return None
    cal_vectors, cal_rows = calibration
    sku_category = {r.sku: r.category for r in rows}
    keep = [i for i, r in enumerate(cal_rows) if r.sku in sku_category]
    if len(keep) < len(cal_rows):
        log.warning("calibration queries of unknown SKUs ignored", extra={"count": len(cal_rows) - len(keep)})
    if not keep:
        return None
    return Calibration(
        vectors=cal_vectors[keep],
        labels=np.asarray([cat_index[sku_category[cal_rows[i].sku]] for i in keep]),
        skus=np.asarray([cal_rows[i].sku for i in keep]),
        seen=np.asarray([cal_rows[i].sha256 in training for i in keep]) if training else None,
    )


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:60] or "category"


def build_index(
    catalogue: Path,
    images_root: Path,
    out_dir: Path,
    model_dir: Path,
    options: BuildOptions = BuildOptions(),
    embedder: Embedder | None = None,
    calibration_queries: Path | None = None,
    calibration_root: Path | None = None,
    engine: BuildEngine | None = None,
) -> BuildResult:
    """Build and publish a version. `calibration_queries` (a CSV of real query photos of catalogue SKUs, images
    under `calibration_root`, default `images_root`) makes the router's temperature, probe_mass and open-set
    thresholds measured on real queries instead of held-out catalogue photos."""
    rows, problems = read_catalogue(catalogue)
    n_unreadable_rows = len(problems)  # images_total counts every catalogue row, rejected ones included
    for p in problems:
        log.warning("catalogue row skipped", extra={"line": p.line, "reason": p.reason})
    if embedder is None:
        embedder = OnnxEmbedder(model_dir, intra_op_threads=options.threads)
    vectors, kept, embed_problems = embed_catalogue(rows, images_root, embedder, options, engine)
    problems = problems + embed_problems
    coverage = coverage_of(rows, kept, problems, total=len(rows) + n_unreadable_rows)
    check_coverage(coverage, problems, options, out_dir, catalogue, images_root)
    calibration = None
    if calibration_queries is not None:
        calibration = embed_calibration(calibration_queries, calibration_root or images_root, embedder, options, engine)

    result = publish_vectors(
        vectors,
        kept,
        out_dir,
        embedder,
        options,
        problems=problems,
        total=coverage.images_total,
        lost_skus=coverage.lost_skus,
        calibration=calibration,
        training_digests=embedder.card.training_digests(model_dir),
        engine=engine,
    )
    (out_dir / REFUSED_REPORT).unlink(missing_ok=True)  # an earlier refusal no longer describes the index
    report = result.router_report
    log.info("router decided", extra={"summary": report.summary()})
    if not report.calibration_source.startswith("calibration"):
        log.warning(
            "no --calibration-queries: the router was measured on held-out catalogue photos, not on real query "
            "photos; give the build query photos of catalogue SKUs for figures that match production"
        )
    return result


def embed_calibration(
    queries: Path, root: Path, embedder: Embedder, options: BuildOptions, engine: BuildEngine | None = None
) -> tuple[np.ndarray, list[CatalogueRow]]:
    cal_rows, cal_problems = read_catalogue(queries)
    cal_vectors, cal_kept, cal_embed_problems = embed_catalogue(cal_rows, root, embedder, options, engine)
    for p in cal_problems + cal_embed_problems:
        log.warning("calibration query skipped", extra={"image": p.image, "reason": p.reason})
    return cal_vectors, cal_kept


def coverage_of(
    rows: Sequence[CatalogueRow], kept: Sequence[CatalogueRow], problems: Sequence[RowProblem], *, total: int
) -> Coverage:
    """A SKU named by any row (usable or not) is lost when none of its rows was embedded."""
    skus = {r.sku for r in rows} | {p.sku for p in problems if p.sku}
    lost = skus - {r.sku for r in kept}
    return Coverage(images_total=total, images_indexed=len(kept), skus_total=len(skus), lost_skus=tuple(sorted(lost)))


def check_coverage(
    coverage: Coverage,
    problems: Sequence[RowProblem],
    options: BuildOptions,
    out_dir: Path,
    catalogue: Path,
    images_root: Path,
) -> None:
    """Refuse, before anything is written into the index directory but the refusal's report, a build that indexes
    nothing (CatalogueError) or loses more than the options allow (BuildRefused)."""
    c = coverage
    reasons = []
    if options.max_lost_skus.exceeded(len(c.lost_skus), c.skus_total):
        reasons.append(
            f"{len(c.lost_skus)} of {c.skus_total} SKUs would lose every image (--max-lost-skus "
            f"{options.max_lost_skus}): {_first(c.lost_skus)}"
        )
    if options.max_failed_images.exceeded(c.images_failed, c.images_total):
        reasons.append(
            f"{c.images_failed} of {c.images_total} images failed (fraction {c.images_failed / c.images_total:.3f}, "
            f"--max-failed-images {options.max_failed_images})"
        )
    if c.images_indexed and not reasons:
        return
    if not c.images_total:
        raise CatalogueError(f"{catalogue}: the catalogue has no rows")
    report = _write_refused_report(out_dir, catalogue, c, problems, "; ".join(reasons))
    if not c.images_indexed:
        first = f" (first: line {problems[0].line}: {problems[0].image}: {problems[0].reason})" if problems else ""
        raise CatalogueError(
            f"{catalogue}: no image could be embedded, {c.images_failed} of {c.images_total} rows failed{first}; "
            f"check the CSV and --images-root ({images_root}); report: {report}"
        )
    raise BuildRefused(
        f"build refused, nothing published, CURRENT unchanged: {'; '.join(reasons)}; report: {report}",
        lost_skus=list(c.lost_skus),
        report=str(report),
    )


def _first(names: Sequence[str]) -> str:
    shown = ", ".join(names[:LOST_SKUS_NAMED])
    return shown + (f" and {len(names) - LOST_SKUS_NAMED} more" if len(names) > LOST_SKUS_NAMED else "")


def _write_refused_report(
    out_dir: Path, catalogue: Path, coverage: Coverage, problems: Sequence[RowProblem], reason: str
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "refused": reason or "no image could be embedded",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "catalogue": str(catalogue),
        **coverage.report(problems),
    }
    path = out_dir / REFUSED_REPORT
    tmp = path.with_name(f".{REFUSED_REPORT}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)  # a reader never sees half a report
    return path


def publish_vectors(
    vectors: np.ndarray,
    rows: list[CatalogueRow],
    out_dir: Path,
    embedder: Embedder,
    options: BuildOptions = BuildOptions(),
    *,
    problems: list[RowProblem] | None = None,
    total: int | None = None,
    lost_skus: Sequence[str] = (),
    calibration: tuple[np.ndarray, list[CatalogueRow]] | None = None,
    training_digests: frozenset[str] = frozenset(),
    catalogue_seq: int | None = None,
    catalogue_id: str | None = None,
    n_views: int = 0,
    engine: BuildEngine | None = None,
) -> BuildResult:
    """Write a version from embedded rows (`embedder` gives the model identity), then publish it: for
    build_index, compaction (`catalogue_seq`: the database's sequence number the rows hold; `n_views` rows are
    catalogue views, not images) and benchmarks of synthetic vectors."""
    problems = problems or []
    coverage = Coverage(
        images_total=total if total is not None else len(rows) - n_views,
        images_indexed=len(rows) - n_views,
        skus_total=len({r.sku for r in rows} | set(lost_skus)),
        lost_skus=tuple(lost_skus),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = out_dir / f".building-{uuid.uuid4().hex[:12]}"
    (staging / "shards").mkdir(parents=True)
    try:
        manifest = _write_version(
            staging, vectors, rows, problems, embedder, options,
            coverage=coverage, calibration=calibration, training_digests=training_digests, n_views=n_views,
            engine=engine or LocalEngine(),
        )  # fmt: skip
        if catalogue_seq is not None:
            manifest = manifest.model_copy(update={"catalogue_seq": catalogue_seq, "catalogue_id": catalogue_id})
            write_manifest(staging, manifest)
        final = out_dir / manifest.version
        if final.is_dir():
            # The same content hash in the same second: that version is this one (a repeated forced build).
            shutil.rmtree(staging)
        else:
            make_read_only(staging)
            staging.rename(final)  # the version appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish_current(out_dir, manifest.version)
    log.info(
        "index built",
        extra={"version": manifest.version, "indexed": coverage.summary(), "problems": len(problems)},
    )
    return BuildResult(final, manifest, problems, coverage)


@dataclass(frozen=True)
class _Grouped:
    """The embedded rows grouped by category (shard-local id i is item row offset + i), and the way back to
    catalogue order."""

    vectors: np.ndarray
    labels: np.ndarray
    rows: list[CatalogueRow]
    categories: list[str]
    back: np.ndarray  # grouped position -> catalogue order
    category_source: Literal["catalogue", "kmeans"]
    n_clusters: int | None


def _write_version(
    vdir: Path,
    vectors: np.ndarray,
    rows: list[CatalogueRow],
    problems: list[RowProblem],
    embedder: Embedder,
    options: BuildOptions,
    coverage: Coverage,
    calibration: tuple[np.ndarray, list[CatalogueRow]] | None = None,
    training_digests: frozenset[str] = frozenset(),
    n_views: int = 0,
    engine: BuildEngine | None = None,
) -> Manifest:
    """categories -> shards -> router -> item table and build report -> manifest."""
    grouped = _group_by_category(vectors, rows)
    entries = _write_shards(vdir, grouped, options, engine or LocalEngine())
    report = _write_router(vdir, grouped, embedder, options, calibration, training_digests, n_views)
    if calibration is not None:
        write_calibration(vdir / CALIBRATION_FILE, calibration, embedder.card.sha256)
    item_rows: list[dict[str, Any]] = [
        {"sku": r.sku, "category": r.category, "image": r.image, "title": r.title, "attributes": r.attributes}
        | ({"image_url": r.image_url} if r.image_url else {})
        for r in grouped.rows
    ]
    ItemTable.write(item_rows, vdir / "items.jsonl", vdir / "items.offsets.npy")
    attributes = AttributeIndex.write([r.attributes for r in grouped.rows], vdir, skus=[r.sku for r in grouped.rows])
    (vdir / "build_report.json").write_text(json.dumps(coverage.report(problems), indent=2) + "\n")
    total = coverage.images_total
    manifest = _manifest(
        vdir, grouped, entries, report, embedder, options, total=total, failed=len(problems), attributes=attributes
    )
    write_manifest(vdir, manifest)
    return manifest


CALIBRATION_FILE = "calibration.npz"


def write_calibration(path: Path, calibration: tuple[np.ndarray, list[CatalogueRow]], model: str) -> None:
    """The calibration queries' vectors and rows, kept in the version so that a compaction (`vps compact`, which
    has no query photos) calibrates the router on them again instead of falling back to held-out catalogue
    photos."""
    vectors, rows = calibration
    np.savez(
        path,
        vectors=np.asarray(vectors, dtype=np.float32),
        skus=np.asarray([r.sku for r in rows], dtype=str),
        images=np.asarray([r.image for r in rows], dtype=str),
        sha256=np.asarray([r.sha256 for r in rows], dtype=str),
        model=np.asarray(model),
    )


def read_calibration(version_dir: Path, model: str) -> tuple[np.ndarray, list[CatalogueRow]] | None:
    """A version's calibration queries, when it has them and they were embedded by `model` (None otherwise: a
    compaction with another model has no vectors for them and says so)."""
    path = version_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        if str(z["model"]) != model:
            log.warning("calibration queries of the live version not used: embedded by another model")
            return None
        rows = [
            CatalogueRow(line=i + 2, sku=str(sku), category="", image=str(image), sha256=str(digest))
            for i, (sku, image, digest) in enumerate(zip(z["skus"], z["images"], z["sha256"], strict=True))
        ]
        return np.asarray(z["vectors"], dtype=np.float32), rows


def _group_by_category(vectors: np.ndarray, rows: list[CatalogueRow]) -> _Grouped:
    category_source: Literal["catalogue", "kmeans"] = "catalogue"
    n_clusters = None
    if not any(r.category for r in rows):
        rows, n_clusters = assign_clusters(vectors, rows)
        category_source = "kmeans"
        log.info("no category column: clustered the catalogue", extra={"clusters": n_clusters})
    categories = sorted({r.category for r in rows})
    cat_index = {c: i for i, c in enumerate(categories)}
    labels = np.asarray([cat_index[r.category] for r in rows])
    order = np.argsort(labels, kind="stable")
    return _Grouped(
        vectors=vectors[order],
        labels=labels[order],
        rows=[rows[i] for i in order],
        categories=categories,
        back=np.argsort(order, kind="stable"),
        category_source=category_source,
        n_clusters=n_clusters,
    )


def _write_shards(vdir: Path, g: _Grouped, options: BuildOptions, engine: BuildEngine) -> list[CategoryEntry]:
    # Rows are grouped by category (sorted labels), so each shard's vectors are one contiguous slice: a view of
    # the grouped vectors, not one more copy.
    ends = np.searchsorted(g.labels, np.arange(len(g.categories)), side="right")
    spans = list(zip([0, *ends[:-1].tolist()], ends.tolist(), strict=True))
    rels = [f"shards/{ci:04d}-{_slug(name)}{SHARD_SUFFIX[options.backend]}" for ci, name in enumerate(g.categories)]
    engine.build_shards(
        [ShardJob(g.vectors[a:b], vdir / rel) for (a, b), rel in zip(spans, rels, strict=True)], options.stages()
    )
    return [
        CategoryEntry(
            name=name,
            shard=rel,
            n_vectors=b - a,
            n_skus=len({g.rows[i].sku for i in range(a, b)}),
            offset=a,
            sha256=sha256_file(vdir / rel),
        )
        for name, rel, (a, b) in zip(g.categories, rels, spans, strict=True)
    ]


def _write_router(
    vdir: Path,
    g: _Grouped,
    embedder: Embedder,
    options: BuildOptions,
    calibration: tuple[np.ndarray, list[CatalogueRow]] | None,
    training_digests: frozenset[str],
    n_views: int = 0,
) -> RouterReport:
    # The router sees rows in catalogue order (the held-out draws are seeded over that order), images only: the
    # catalogue views (the last n_views rows) would put copies of a held-out photo in the fit set.
    back = g.back[: len(g.back) - n_views]
    cat_index = {c: i for i, c in enumerate(g.categories)}
    router, report = train_router(
        g.vectors[back],
        g.labels[back],
        g.categories,
        [g.rows[i].sku for i in back],
        calibration=_calibration_set(calibration, g.rows, cat_index, training_digests),
        seen=np.asarray([g.rows[i].sha256 in training_digests for i in back]) if training_digests else None,
        model_card_unseen_top1=embedder.card.unseen_router_top1(),
        min_images=options.router_min_images,
        max_probes=options.max_probes,
        max_loss=options.max_routing_loss,
        target_precision=options.target_precision,
        near_duplicate_cosine=options.near_duplicate_cosine,
        exhaustive_below=options.exhaustive_below,
        router_kind=options.router,
    )
    router.save(vdir / "router.npz")
    return report


def _manifest(
    vdir: Path,
    g: _Grouped,
    entries: list[CategoryEntry],
    report: RouterReport,
    embedder: Embedder,
    options: BuildOptions,
    *,
    total: int,
    failed: int,
    attributes: str,
) -> Manifest:
    """Every file's size and sha256, and a version name from the time and the content hash."""
    files = {
        str(p.relative_to(vdir)): FileEntry(sha256=sha256_file(p), size=p.stat().st_size)
        for p in sorted(vdir.rglob("*"))
        if p.is_file()
    }
    content = hashlib.sha256("".join(f"{k}:{v.sha256}" for k, v in files.items()).encode()).hexdigest()
    created = datetime.now(UTC)
    card = embedder.card
    return Manifest(
        format_version=FORMAT_VERSION,
        version=f"{created:%Y%m%dT%H%M%SZ}-{content[:8]}",
        created=created.isoformat(timespec="seconds"),
        model=ModelRef(name=card.name, version=card.version, sha256=card.sha256, dim=card.output.dim),
        backend=options.backend,
        dim=embedder.dim,
        n_items=len(g.rows),
        attributes=attributes,
        categories=entries,
        category_source=g.category_source,
        probe_mass=report.probe_mass,
        max_probes=report.max_probes,
        thresholds=report.thresholds,
        global_threshold=report.global_threshold,
        router_report=report.as_dict(),
        build=BuildParams(
            M=options.M,
            ef_construction=options.ef_construction,
            ef_search=options.ef_search,
            images_total=total,
            images_failed=failed,
            n_clusters=g.n_clusters,
            catalogue_views=options.catalogue_views or 0,
            views_max_images=options.views_max_images,
            rescore_factor=options.recorded_rescore_factor(),
        ),
        files=files,
    )
