"""Searching an index version with live changes on top (app/engine/delta.py): masked SKUs never crowd out the
rest, moved SKUs are found where they are now, a compaction's version leaves nothing live."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.engine.delta import Delta, DeltaImage, DeltaProduct
from app.engine.embedding import OnnxEmbedder
from app.engine.search import resolve_params
from app.offline.build.build_index import BuildOptions, publish_vectors
from app.offline.datasets.catalogue import CatalogueRow
from app.service.config import Settings
from app.service.engines import load_engine


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_a_sku_moved_away_with_many_photos_does_not_empty_its_old_category(tiny_model: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dim = OnnxEmbedder(tiny_model).dim
    centre = _unit(rng.normal(size=dim))
    crowd = _unit(centre + 0.05 * rng.normal(size=(120, dim)))  # many photos of one SKU, nearest the query
    rest = _unit(centre + 0.6 * rng.normal(size=(5, dim)))  # another SKU of the same category, farther
    other = _unit(rng.normal(size=(5, dim)))  # a second category
    vectors = np.vstack([crowd, rest, other])
    rows = [CatalogueRow(i, "crowd", "apple", f"c{i}.jpg") for i in range(120)]
    rows += [CatalogueRow(120 + i, "rest", "apple", f"r{i}.jpg") for i in range(5)]
    rows += [CatalogueRow(125 + i, "pear", "pear", f"p{i}.jpg") for i in range(5)]
    out = tmp_path / "index"
    publish_vectors(vectors, rows, out, OnnxEmbedder(tiny_model), BuildOptions(M=8, ef_construction=40, progress=False))
    engine = load_engine(Settings(index_dir=out, model_dir=tiny_model, warmup_queries=0))
    params = resolve_params(engine.manifest, k=1, category="apple")
    assert engine.search_vector(centre, params).results[0].item["sku"] == "crowd"

    moved = DeltaProduct("crowd", "pear", "Crowd", {}, (DeltaImage("0" * 24, crowd[0]),))
    engine.delta = Delta.empty(0).applied({"crowd": moved}, 1, 0.0)
    hits = engine.search_vector(centre, params).results
    assert [h.item["sku"] for h in hits] == ["rest"]  # 120 masked rows (beyond the 64 fetched) did not empty apple
    pear = engine.search_vector(centre, resolve_params(engine.manifest, k=1, category="pear")).results
    assert pear[0].item["sku"] == "crowd" and pear[0].row < 0  # found where it is now, from the delta


def test_a_deleted_sku_is_excluded_inside_the_search(tiny_model: Path, tmp_path: Path) -> None:
    """600 photos of a deleted SKU nearest the query: its rows are excluded from the graph walk itself (the
    version's SKU column), so the category's other SKU is found without asking for ever more rows. (A build of a
    two-SKU catalogue with thousands of photos of one takes minutes: its router measurement looks for 5 SKUs.)"""
    rng = np.random.default_rng(1)
    dim = OnnxEmbedder(tiny_model).dim
    centre = _unit(rng.normal(size=dim))
    crowd = _unit(centre + 0.05 * rng.normal(size=(600, dim)))
    rest = _unit(centre + 0.6 * rng.normal(size=(5, dim)))
    rows = [CatalogueRow(i, "crowd", "apple", f"c{i}.jpg") for i in range(600)]
    rows += [CatalogueRow(600 + i, "rest", "apple", f"r{i}.jpg") for i in range(5)]
    out = tmp_path / "index"
    options = BuildOptions(M=8, ef_construction=40, progress=False)
    publish_vectors(np.vstack([crowd, rest]), rows, out, OnnxEmbedder(tiny_model), options)
    engine = load_engine(Settings(index_dir=out, model_dir=tiny_model, warmup_queries=0))
    engine.delta = Delta.empty(0).applied({"crowd": None}, 1, 0.0)  # deleted
    hidden = engine.hidden_rows(engine.delta)
    assert hidden is not None and int(hidden.sum()) == 600 and engine.hidden_rows(engine.delta) is hidden
    params = resolve_params(engine.manifest, k=1, category="apple")
    assert [h.item["sku"] for h in engine.search_vector(centre, params).results] == ["rest"]
    filtered = resolve_params(engine.manifest, k=1, category="apple", filter="sku=rest")
    assert [h.item["sku"] for h in engine.search_vector(centre, filtered).results] == ["rest"]


def test_a_new_version_keeps_only_changes_it_does_not_hold() -> None:
    v = _unit(np.ones((1, 4)))[0]
    held = Delta.empty(10).applied(
        {"a": DeltaProduct("a", "c", "A", {}, (DeltaImage("1" * 24, v),)), "b": None}, 20, 0.0, {"a": 12, "b": 18}
    )
    compacted = Delta.empty(15).carried_from(held)  # a version built at 15 holds a's change (12), not b's (18)
    assert set(compacted.products) == {"b"} and compacted.seq == 20 and compacted.n_items == 0
    assert Delta.empty(25).carried_from(held).products == {}  # newer than all of it: nothing to carry
    rollback = Delta.empty(5).carried_from(held)  # an older version: changes 6-10 are not in `held`
    assert rollback.products == {} and rollback.seq == 5
