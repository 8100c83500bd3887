"""Index versions from the catalogue database: a CSV import embeds only new images and publishes only when
something changed; compaction folds API changes into a version at a sequence number; prune keeps rollbacks."""

from __future__ import annotations

import csv
import io
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.artifacts.hashing import sha256_file
from app.artifacts.items import ItemTable
from app.artifacts.manifest import earlier_versions, read_manifest, resolve_current
from app.catalogue.store import CatalogueStore, NewImage, sha256_of
from app.engine.embedding import Embedder, OnnxEmbedder
from app.engine.search import resolve_params
from app.offline.build.build_index import BuildOptions, BuildResult, embed_calibration, read_calibration
from app.offline.build.compact import compact, import_catalogue, prune, views_key
from app.service.config import Settings
from app.service.engines import load_engine
from tests.helpers import DelegatingEmbedder, encode

OPTIONS = BuildOptions(M=8, ef_construction=40, progress=False)


class CountingEmbedder(DelegatingEmbedder):
    """The real tiny model, counting the images it embeds (the port the build takes)."""

    def __init__(self, real: Embedder) -> None:
        super().__init__(real)
        self.images = 0

    def embed(self, batch: np.ndarray) -> np.ndarray:
        self.images += len(batch)
        return super().embed(batch)


@pytest.fixture
def store(catalogue_url: str) -> CatalogueStore:
    s = CatalogueStore(catalogue_url)
    s.create_schema()
    return s


@pytest.fixture
def embedder(tiny_model: Path) -> CountingEmbedder:
    return CountingEmbedder(OnnxEmbedder(tiny_model))


def _magenta(n: int) -> bytes:
    arr = np.clip(
        np.full((80, 96, 3), (230, 20, 230), np.float32) + np.random.default_rng(n).normal(0, 6, (80, 96, 3)), 0, 255
    )
    return encode(Image.fromarray(arr.astype(np.uint8), "RGB"))


def test_an_unchanged_catalogue_embeds_nothing_and_builds_no_version(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    first = import_catalogue(catalogue, catalogue.parent, out, store, embedder, OPTIONS)
    assert first.built is not None and first.imported is not None and first.imported.changed == 6
    assert embedder.images == 18 and first.built.manifest.catalogue_seq == first.seq == store.head()
    again = import_catalogue(catalogue, catalogue.parent, out, store, embedder, OPTIONS)
    assert again.built is None and again.live_version == first.built.manifest.version
    assert embedder.images == 18  # every vector read back from the database
    assert again.imported is not None and (again.imported.changed, again.imported.unchanged) == (0, 6)
    assert [d.name for d in out.iterdir() if d.is_dir()] == [first.built.manifest.version]


def test_a_changed_row_replaces_its_sku_and_a_full_import_removes_the_missing(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    import_catalogue(catalogue, catalogue.parent, out, store, embedder, OPTIONS)
    with catalogue.open() as fh:
        rows = list(csv.DictReader(fh))
    kept = [r for r in rows if r["sku"] != "white-milk"]
    for r in kept:
        if r["sku"] == "red-apple":
            r["title"] = "Red apple, new label"
    smaller = tmp_path / "smaller.csv"
    with smaller.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    partial = import_catalogue(smaller, catalogue.parent, out, store, embedder, OPTIONS)
    assert partial.imported is not None and (partial.imported.changed, partial.imported.removed) == (1, 0)
    assert store.get_product("white-milk").sku == "white-milk"  # not a full import: kept
    full = import_catalogue(smaller, catalogue.parent, out, store, embedder, OPTIONS, full=True)
    assert full.imported is not None and full.imported.removed == 1 and full.built is not None
    items = ItemTable.load(resolve_current(out) / "items.jsonl", resolve_current(out) / "items.offsets.npy")
    skus = {items.get(i)["sku"] for i in range(len(items))}
    assert "white-milk" not in skus and len(skus) == 5
    assert {items.get(i)["title"] for i in range(len(items)) if items.get(i)["sku"] == "red-apple"} == {
        "Red apple, new label"
    }


def test_compaction_folds_api_changes_into_a_version_that_serves_them(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    import_catalogue(catalogue, catalogue.parent, out, store, embedder, OPTIONS)
    store.put_product("magenta-soap", "soap", "Magenta soap", {"price": 2.5})
    data = _magenta(1)
    vector = embedder.embed(embedder.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0]
    store.add_images("magenta-soap", [NewImage(sha256_of(data), data, vector)], embedder.card.sha256)
    result = compact(store, out, embedder, OPTIONS)
    assert result.built is not None and result.built.manifest.catalogue_seq == store.head()
    assert "soap" in [c.name for c in result.built.manifest.categories]  # a shard and a router entry now
    engine = load_engine(Settings(index_dir=out, model_dir=tiny_model, warmup_queries=0))
    assert engine.delta.base_seq == store.head() and engine.delta.n_items == 0
    outcome = engine.search_image(_magenta(9), resolve_params(engine.manifest, k=1))
    hit = outcome.results[0].item
    assert (hit["sku"], hit["attributes"]) == ("magenta-soap", {"price": 2.5})
    assert hit["image_url"].startswith("/v1/products/magenta-soap/images/")
    assert compact(store, out, embedder, OPTIONS).built is None  # nothing new since


def test_prune_keeps_current_and_the_newest_rollbacks(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    out = tmp_path / "index"
    import_catalogue(catalogue, catalogue.parent, out, store, embedder, OPTIONS)
    for n in range(3):
        store.put_product(f"soap-{n}", "soap", "Soap", {})
        data = _magenta(n)
        vector = embedder.embed(embedder.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0]
        store.add_images(f"soap-{n}", [NewImage(sha256_of(data), data, vector)], embedder.card.sha256)
        assert compact(store, out, embedder, OPTIONS).built is not None
    current = resolve_current(out).name
    newest_earlier = earlier_versions(out)[0].name
    removed = prune(out, keep=1)
    assert len(removed) == 2 and current not in removed
    assert {d.name for d in out.iterdir() if d.is_dir()} == {current, newest_earlier}
    assert read_manifest(resolve_current(out)).version == current


def test_compaction_calibrates_on_the_builds_query_photos_again(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    """A compaction has no query photos: the ones the import was calibrated on travel in the version."""
    out = tmp_path / "index"
    calibration = embed_calibration(catalogue, catalogue.parent, embedder, OPTIONS)
    first = import_catalogue(catalogue, catalogue.parent, out, store, embedder, OPTIONS, calibration=calibration)
    assert first.built is not None
    assert first.built.manifest.router_report["calibration_source"] == "calibration query photos"
    store.put_product("magenta-soap", "soap", "Magenta soap", {})
    data = _magenta(1)
    vector = embedder.embed(embedder.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None])[0]
    store.add_images("magenta-soap", [NewImage(sha256_of(data), data, vector)], embedder.card.sha256)
    result = compact(store, out, embedder, OPTIONS)
    assert result.built is not None
    assert result.built.manifest.router_report["calibration_source"] == "calibration query photos"
    assert "calibration.npz" in result.built.manifest.files  # verified on load like every other file
    again = read_calibration(resolve_current(out), embedder.card.sha256)
    assert again is not None and again[0].shape == calibration[0].shape
    assert read_calibration(resolve_current(out), "another-model") is None


def _imported(
    catalogue: Path, out: Path, store: CatalogueStore, embedder: CountingEmbedder, options: BuildOptions
) -> BuildResult:
    """The catalogue imported and built once with `options`."""
    first = import_catalogue(catalogue, catalogue.parent, out, store, embedder, options)
    assert first.built is not None
    return first.built


def test_catalogue_views_are_stored_once_and_kept_by_a_scheduled_compaction(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    out, with_views = tmp_path / "index", replace(OPTIONS, catalogue_views=4, views_max_images=3)
    first = _imported(catalogue, out, store, embedder, with_views)
    manifest = first.manifest
    assert (manifest.build.catalogue_views, manifest.build.views_max_images) == (4, 3)
    assert manifest.n_items == 18 * 5 and first.coverage.images_indexed == 18  # views are not images
    assert embedder.images == 18 + 18 * 4
    items = ItemTable.load(first.version_dir / "items.jsonl", first.version_dir / "items.offsets.npy")
    counts = Counter(items.get(i)["image"] for i in range(90))
    assert len(counts) == 18 and set(counts.values()) == {5}  # each view is its image's row again

    # A scheduled compaction (no view options) keeps the build's views and reads them back from the database.
    again = compact(store, out, embedder, replace(OPTIONS, catalogue_views=None), force=True)
    assert again.built is not None and again.built.manifest.n_items == 90
    assert embedder.images == 18 + 18 * 4
    sha = next(iter(store.snapshot(embedder.card.sha256)[1])).images[0].sha256
    stored = store.stored_vectors([sha], views_key(embedder.card.sha256, 4))[sha]
    assert stored.shape == (4 * embedder.dim,) and np.isfinite(stored).all()

    # A SKU with more images than views_max_images gets none; asking for none removes them.
    fewer = compact(store, out, embedder, replace(with_views, views_max_images=2), force=True)
    assert fewer.built is not None and fewer.built.manifest.n_items == 18
    none = compact(store, out, embedder, OPTIONS, force=True)
    assert none.built is not None and none.built.manifest.build.catalogue_views == 0


def test_a_scheduled_compaction_keeps_views_and_builds_nothing_when_nothing_changed(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    out, with_views = tmp_path / "index", replace(OPTIONS, catalogue_views=2, views_max_images=3)
    first = _imported(catalogue, out, store, embedder, with_views)
    scheduled = compact(store, out, embedder, replace(OPTIONS, catalogue_views=None))
    assert scheduled.built is None and scheduled.live_version == first.manifest.version
    # The router is fitted on images only (a view of a held-out photo in the fit set would flatter it): the same
    # router and report as a version without views.
    plain = compact(store, out, embedder, OPTIONS, force=True)
    assert plain.built is not None and plain.built.manifest.n_items == 18
    assert plain.built.manifest.router_report == first.manifest.router_report
    assert sha256_file(plain.built.version_dir / "router.npz") == sha256_file(first.version_dir / "router.npz")


def test_compaction_to_compressed_shards_builds_once_and_then_holds(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    """Switching the backend (or its rescore factor) is a change the live version does not hold; the same
    choice again is not."""
    out = tmp_path / "index"
    first = _imported(catalogue, out, store, embedder, OPTIONS)
    sq8 = replace(OPTIONS, backend="faiss-sq8", rescore_factor=3)
    switched = compact(store, out, embedder, sq8)
    assert switched.built is not None and switched.built.manifest.version != first.manifest.version
    assert (switched.built.manifest.backend, switched.built.manifest.build.rescore_factor) == ("faiss-sq8", 3)
    assert embedder.images == 18  # the stored vectors, not the images again
    again = compact(store, out, embedder, sq8)
    assert again.built is None and again.live_version == switched.built.manifest.version
    other_factor = compact(store, out, embedder, replace(sq8, rescore_factor=5))
    assert other_factor.built is not None and other_factor.built.manifest.build.rescore_factor == 5
    assert first.manifest.build.rescore_factor is None  # float shards record none


def test_a_compaction_that_names_no_index_keeps_the_live_versions(
    catalogue: Path, store: CatalogueStore, embedder: CountingEmbedder, tmp_path: Path
) -> None:
    """`vps compact` without --backend (the service's automatic compaction, the CronJob): backend, graph and
    rescore factor as the live version was built, not the defaults."""
    out = tmp_path / "index"
    first = _imported(catalogue, out, store, embedder, replace(OPTIONS, backend="faiss-sq8", rescore_factor=3))
    scheduled = replace(BuildOptions(progress=False), index_from_live=True)  # defaults: faiss, M 32, factor 1
    held = compact(store, out, embedder, scheduled)
    assert held.built is None and held.live_version == first.manifest.version
    rebuilt = compact(store, out, embedder, scheduled, force=True)
    assert rebuilt.built is not None
    m = rebuilt.built.manifest
    assert (m.backend, m.build.M, m.build.ef_construction, m.build.rescore_factor) == ("faiss-sq8", 8, 40, 3)
