"""Attribute filters: the grammar and its errors, the build's typed columns, and filtered search as exact as an
exact search over the matching items at every selectivity (the exact scan and the filtered graph walk both)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.artifacts.attributes import AttributeIndex
from app.engine.delta import Delta, DeltaImage, DeltaProduct
from app.engine.embedding import OnnxEmbedder
from app.engine.filters import compile_filter, parse_filter
from app.engine.search import EXACT_FILTER_ROWS, SearchEngine, SearchParams
from app.errors import InvalidFilter, UnknownFilterKey
from app.offline.build.build_index import BuildOptions, publish_vectors
from app.offline.datasets.catalogue import CatalogueRow
from app.service.config import Settings
from app.service.engines import load_engine

BRANDS = ["Arla", "Valio", "Garant", "Oatly", "Coop"]


def test_the_grammar_joins_or_within_a_key_and_and_across_keys() -> None:
    f = parse_filter('brand=Arla AND (pack=1l OR pack=1.5l) and price<20 AND title="oat drink \\"x\\""')
    assert [(g.key, [(c.op, c.value) for c in g.conditions]) for g in f.groups] == [
        ("brand", [("=", "Arla")]),
        ("pack", [("=", "1l"), ("=", "1.5l")]),
        ("price", [("<", "20")]),
        ("title", [("=", 'oat drink "x"')]),
    ]
    assert parse_filter("price>=2.5").groups[0].conditions[0].op == ">="


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("brand=", "expected a value at character 7"),
        ("brand Arla", "expected = < <= > >= at character 7"),
        ("(pack=1l OR brand=Arla)", "'brand' at character 13 differs"),
        ("(pack=1l OR pack=2l", "expected OR or ')' at character 20"),
        ("brand=Arla pack=1l", "expected AND or the end at character 12"),
        ("brand=Arla AND", "expected a key at character 15"),
        ('brand="Arla', "unexpected character '\"' at character 7"),
        ("=1", "expected a key at character 1"),
    ],
)
def test_syntax_errors_name_the_position(text: str, needle: str) -> None:
    with pytest.raises(InvalidFilter) as err:
        parse_filter(text)
    assert needle in err.value.message and err.value.code == "invalid_filter" and err.value.status == 422


def _columns(tmp_path: Path) -> AttributeIndex:
    attrs: list[dict[str, Any]] = [
        {"brand": "Arla", "price": "19.9", "pack": "1l"},
        {"brand": "Valio", "price": "25", "pack": "1.5l"},
        {"brand": "Arla", "price": 12, "pack": 2},  # numbers from the API: a string column keeps their text
        {"brand": "Oatly"},
    ]
    rel = AttributeIndex.write(attrs, tmp_path)
    listed = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    return AttributeIndex.load(tmp_path, rel, 4, listed)


def test_the_build_types_columns_and_the_mask_keeps_exactly_the_matching_rows(tmp_path: Path) -> None:
    cols = _columns(tmp_path)
    assert {k: c.kind for k, c in cols.columns.items()} == {"brand": "string", "price": "number", "pack": "string"}
    offsets = [(0, 2), (2, 2)]

    def rows(text: str) -> list[int]:
        return np.flatnonzero(compile_filter(parse_filter(text), cols, ["a", "b"], offsets).mask).tolist()

    assert rows("brand=Arla") == [0, 2]
    assert rows("brand=Arla AND price<15") == [2]
    assert rows("(pack=1l OR pack=2)") == [0, 2]
    assert rows("price>=19.9") == [0, 1]  # row 3 has no price: no comparison matches it
    assert rows("category=b") == [2, 3]
    assert rows("(category=a OR category=b) AND brand=Nobody") == []
    compiled = compile_filter(parse_filter("brand=Arla AND price<15"), cols, ["a", "b"], offsets)
    assert compiled.per_shard == (0, 1)
    assert compiled.matches({"category": "b", "attributes": {"brand": "Arla", "price": 3}})
    assert not compiled.matches({"category": "b", "attributes": {"brand": "Arla", "price": "30"}})
    assert not compiled.matches({"category": "b", "attributes": {"brand": "Arla"}})


@pytest.mark.parametrize(
    ("text", "error", "needle"),
    [
        ("brnd=Arla", UnknownFilterKey, "unknown key 'brnd' at character 1; keys: brand, category, pack, price"),
        ("brand<3", InvalidFilter, "'brand' holds text: '<' at character 1 needs a number column"),
        ("price<cheap", InvalidFilter, "'cheap' at character 7 is not one"),
        ("category>a", InvalidFilter, "category takes '=' only"),
    ],
)
def test_keys_and_types_are_checked_against_the_version(
    tmp_path: Path, text: str, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error) as err:
        compile_filter(parse_filter(text), _columns(tmp_path), ["a", "b"], [(0, 2), (2, 2)])
    assert needle in str(err.value)


# --- filtered search against exact search ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def filtered_engine(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> tuple[SearchEngine, np.ndarray]:
    """Two categories of clustered vectors (the first large enough for the filtered graph walk), 4 images a SKU,
    attributes drawn so that filters keep 100 %, 10 %, 1 % and 0.1 % of it."""
    embedder = OnnxEmbedder(tiny_model)
    rng = np.random.default_rng(5)
    n_sku = {"big": 2500, "small": 250}
    rows: list[CatalogueRow] = []
    vectors = []
    for cat, count in n_sku.items():
        centres = rng.standard_normal((count, embedder.dim)).astype(np.float32)
        for s in range(count):
            sku = f"{cat}-{s:05d}"
            # price = 389 s mod 1000 is uniform over 0..999 and a multiple of 5 for every Arla SKU (s = 0 mod 5).
            attrs = {"brand": BRANDS[s % 5], "price": str(389 * s % 1000), "all": "yes"}
            for v in range(4):
                vectors.append(centres[s] + 0.35 * rng.standard_normal(embedder.dim).astype(np.float32))
                rows.append(CatalogueRow(len(rows) + 2, sku, cat, f"{sku}_{v}.jpg", None, attrs))
    x = np.stack(vectors)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = tmp_path_factory.mktemp("filtered")
    publish_vectors(x, rows, out, embedder, BuildOptions(M=16, ef_construction=80, progress=False))
    engine = load_engine(Settings(index_dir=out, model_dir=tiny_model, warmup_queries=0))
    return engine, x


def _exact_skus(engine: SearchEngine, query: np.ndarray, text: str, k: int) -> list[str]:
    """Exact search over the rows the filter keeps, grouped by SKU: the yardstick."""
    mask = engine.compile_filter(text).mask
    vectors = np.concatenate([s.index.vectors() for s in engine.shards])
    rows = np.flatnonzero(mask)
    order = rows[np.argsort(-(vectors[rows] @ query), kind="stable")]
    out: list[str] = []
    for r in order:
        sku = str(engine.items.get(int(r))["sku"])
        if sku not in out:
            out.append(sku)
        if len(out) == k:
            break
    return out


@pytest.mark.parametrize("exact_rows", [EXACT_FILTER_ROWS, 256], ids=["default", "graph-walk"])
@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("all=yes", 1.0),
        ("(brand=Arla OR brand=Valio)", 0.4),
        ("(brand=Arla OR brand=Valio) AND price<250", 0.1),  # 2/5 x 1/4 of the SKUs
        ("brand=Arla AND price<50", 0.01),
        ("brand=Arla AND price<5", 0.001),
    ],
)
def test_filtered_search_finds_what_an_exact_search_over_the_matching_items_finds(
    filtered_engine: tuple[SearchEngine, np.ndarray], text: str, share: float, exact_rows: int
) -> None:
    """With the default threshold every shard here is scanned exactly but at 100 %; with 256 rows the large
    shard's 40 % (4,000 rows) takes the filtered graph walk too (below EXACT_FILTER_SHARE a shard is scanned)."""
    engine, x = filtered_engine
    engine.exact_filter_rows = exact_rows
    compiled = engine.compile_filter(text)
    assert compiled.matching / len(x) == pytest.approx(share, rel=0.5)  # 16 rows at 0.1 %
    big = engine.categories.index("big")
    if share >= 0.4:
        assert compiled.per_shard[big] > exact_rows or exact_rows == EXACT_FILTER_ROWS
    rng = np.random.default_rng(1)
    params = SearchParams(k=10, probe_mass=1.0, max_probes=2, filter=text)
    hits = total = 0
    for i in rng.choice(len(x), size=40, replace=False):
        query = x[i] + 0.2 * rng.standard_normal(x.shape[1]).astype(np.float32)
        query /= np.linalg.norm(query)
        got = [str(h.item["sku"]) for h in engine.search_vector(query, params).results]
        want = _exact_skus(engine, query, text, 10)
        assert all(compiled.mask[h.row] for h in engine.search_vector(query, params).results)
        hits += len(set(got) & set(want))
        total += len(want)
    assert hits / total >= 0.99


def test_filters_apply_to_live_items_and_before_filling_k(filtered_engine: tuple[SearchEngine, np.ndarray]) -> None:
    engine, x = filtered_engine
    vec = x[0]
    live = DeltaProduct("new-oat", "small", "New oat", {"brand": "Oatly", "price": 3}, (DeltaImage("a" * 24, vec),))
    gone = DeltaProduct("new-arla", "small", "New arla", {"brand": "Arla", "price": 3}, (DeltaImage("b" * 24, vec),))
    previous = engine.delta
    engine.delta = Delta.empty(previous.base_seq).applied({p.sku: p for p in (live, gone)}, previous.seq + 1, 0.0)
    try:
        params = SearchParams(k=5, probe_mass=1.0, max_probes=1, category=None, filter="brand=Oatly AND price<4")
        out = engine.search_vector(vec, params)
        skus = [str(h.item["sku"]) for h in out.results]
        assert "new-oat" in skus and "new-arla" not in skus
        assert all(h.item["attributes"]["brand"] == "Oatly" for h in out.results)
        assert len(skus) == 5  # filled from other shards until k matching SKUs were found
    finally:
        engine.delta = previous


def test_pages_are_slices_of_one_ranking(filtered_engine: tuple[SearchEngine, np.ndarray]) -> None:
    engine, x = filtered_engine
    whole = engine.search_vector(x[7], SearchParams(k=30, probe_mass=1.0, max_probes=2))
    pages = [
        engine.search_vector(x[7], SearchParams(k=10, offset=o, probe_mass=1.0, max_probes=2)) for o in (0, 10, 20)
    ]
    assert [str(h.item["sku"]) for p in pages for h in p.results] == [str(h.item["sku"]) for h in whole.results]
    assert pages[2].match and len(pages[2].results) == 10


def test_live_items_match_filters_on_their_sku_and_in_shards_without_matching_base_rows(
    filtered_engine: tuple[SearchEngine, np.ndarray],
) -> None:
    """A filter keeping few base rows searches every shard holding one, and every shard with live rows too; `sku`
    names a changed product by its SKU as it did before the change."""
    engine, x = filtered_engine
    vec = x[-1]  # a vector of the small category
    new = DeltaProduct("brand-new", "small", "New", {"brand": "Arla", "price": 1}, (DeltaImage("c" * 24, vec),))
    renamed = DeltaProduct("big-00000", "big", "Renamed", {"brand": "Arla", "price": 0}, (DeltaImage("d" * 24, x[0]),))
    previous = engine.delta
    engine.delta = Delta.empty(previous.base_seq).applied({p.sku: p for p in (new, renamed)}, previous.seq + 1, 0.0)
    try:
        # Base rows of three `big` SKUs (k of them) and the live product in `small`: before, only `big` was
        # searched (the shards with matching base rows), k was met there and the best match was never seen.
        text = "(sku=big-00005 OR sku=big-00010 OR sku=big-00015 OR sku=brand-new)"
        assert engine.compile_filter(text).per_shard[engine.categories.index("small")] == 0
        out = engine.search_vector(vec, SearchParams(k=3, probe_mass=1.0, max_probes=2, filter=text))
        assert out.results[0].item["sku"] == "brand-new" and len(out.results) == 3
        by_sku = engine.search_vector(x[0], SearchParams(k=1, probe_mass=1.0, max_probes=2, filter="sku=big-00000"))
        assert [h.item["sku"] for h in by_sku.results] == ["big-00000"] and by_sku.results[0].row < 0
    finally:
        engine.delta = previous


def test_identifiers_stay_text_and_booleans_read_as_json_writes_them(tmp_path: Path) -> None:
    attrs: list[dict[str, Any]] = [
        {"ean": "0400000000001", "code": "123", "long": "12345678901234567891", "flag": True},
        {"ean": "400000000001", "code": "000123", "long": "12345678901234567892", "flag": False},
    ]
    rel = AttributeIndex.write(attrs, tmp_path, skus=["000123", "123"])
    listed = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    cols = AttributeIndex.load(tmp_path, rel, 2, listed)
    assert {k: c.kind for k, c in cols.columns.items()} == {
        "ean": "string", "code": "string", "long": "string", "flag": "string", "sku": "string"
    }  # fmt: skip

    def rows(text: str) -> list[int]:
        return np.flatnonzero(compile_filter(parse_filter(text), cols, ["a"], [(0, 2)]).mask).tolist()

    assert rows("sku=123") == [1] and rows("code=123") == [0] and rows("long=12345678901234567891") == [0]
    assert rows("flag=true") == [0] and rows("ean=400000000001") == [1]
    assert parse_filter("brand = Arla  and price<2").canonical == parse_filter("brand=Arla AND price<2").canonical
