"""The pipeline's grouping and routing over real faiss shards, with fake embedder and router behind the ports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.artifacts.items import ItemTable
from app.artifacts.manifest import Manifest
from app.artifacts.shards import FaissHnswShard
from app.engine.search import SearchEngine, SearchParams, Shard
from app.errors import UnknownCategory


class FixedRouter:
    def __init__(self, probs: list[float], names: list[str]) -> None:
        self._probs = np.asarray(probs)
        self._names = names

    @property
    def categories(self) -> list[str]:
        return self._names

    @property
    def dim(self) -> int:
        return 4

    def probabilities(self, query: np.ndarray) -> np.ndarray:
        return self._probs


def _engine(tmp_path: Path, probs: list[float]) -> SearchEngine:
    # Category "a": sku x twice (0.9 and 0.8 to the query), sku y once (0.7). Category "b": sku z (0.95).
    q = np.array([1.0, 0, 0, 0], dtype=np.float32)

    def at(cos: float, axis: int) -> np.ndarray:
        v = np.zeros(4, dtype=np.float32)
        v[0], v[axis] = cos, np.sqrt(1 - cos**2)
        return v

    a = np.stack([at(0.9, 1), at(0.8, 2), at(0.7, 3)])
    b = np.stack([at(0.95, 1)])
    items: list[dict[str, Any]] = [
        {"sku": "x", "category": "a", "image": "x1.jpg"},
        {"sku": "x", "category": "a", "image": "x2.jpg"},
        {"sku": "y", "category": "a", "image": "y.jpg"},
        {"sku": "z", "category": "b", "image": "z.jpg"},
    ]
    shards = []
    for name, vecs, offset in (("a", a, 0), ("b", b, 3)):
        FaissHnswShard.build(vecs, tmp_path / f"{name}.faiss", M=8, ef_construction=16)
        shards.append(Shard(name, offset, FaissHnswShard.load(tmp_path / f"{name}.faiss", ef_search=16)))
    ItemTable.write(items, tmp_path / "items.jsonl", tmp_path / "off.npy")
    engine = SearchEngine(
        embedder=None,  # type: ignore[arg-type]  # search_vector never embeds
        router=FixedRouter(probs, ["a", "b"]),
        shards=shards,
        items=ItemTable.load(tmp_path / "items.jsonl", tmp_path / "off.npy"),
        manifest=Manifest.model_construct(),
        max_image_pixels=1000,
        overfetch=4,
    )
    engine.query = q  # type: ignore[attr-defined]
    return engine


def test_groups_by_sku_keeping_the_best_image(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [0.6, 0.4])
    out = engine.search_vector(engine.query, SearchParams(k=10, probe_mass=1.0, max_probes=2))  # type: ignore[attr-defined]
    assert [h.item["sku"] for h in out.results] == ["z", "x", "y"]
    assert [h.item["image"] for h in out.results] == ["z.jpg", "x1.jpg", "y.jpg"]
    assert out.results[1].score == pytest.approx(0.9, abs=1e-5)


def test_routing_limits_the_shards_searched(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [0.95, 0.05])
    out = engine.search_vector(engine.query, SearchParams(k=2, probe_mass=0.9, max_probes=2))  # type: ignore[attr-defined]
    assert [h.item["sku"] for h in out.results] == ["x", "y"]
    assert [p.category for p in out.probes] == [0] and out.added == []


def test_fewer_than_k_skus_in_the_chosen_shards_fill_from_the_next(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [0.95, 0.05])
    q = engine.query  # type: ignore[attr-defined]
    out = engine.search_vector(q, SearchParams(k=3, probe_mass=0.9, max_probes=2))
    assert [p.category for p in out.probes] == [0] and [p.category for p in out.added] == [1]
    assert [h.item["sku"] for h in out.results] == ["z", "x", "y"]  # ranked by score across all shards searched
    # Only as many SKUs as exist: k=10 returns the 3, having searched both shards.
    assert len(engine.search_vector(q, SearchParams(k=10, probe_mass=0.9, max_probes=1)).results) == 3
    # min_score counts: x alone passes 0.85 in "a", so z is filled in from "b".
    out = engine.search_vector(q, SearchParams(k=2, min_score=0.85, probe_mass=0.9, max_probes=1))
    assert [h.item["sku"] for h in out.results] == ["z", "x"] and len(out.added) == 1
    # The bound: no fill at all when fill_max_probes=0; a forced category never fills.
    assert len(engine.search_vector(q, SearchParams(k=3, probe_mass=0.9, fill_max_probes=0)).results) == 2
    out = engine.search_vector(q, SearchParams(k=3, category="a"))
    assert [h.item["sku"] for h in out.results] == ["x", "y"] and out.added == []


def test_probe_mass_one_searches_every_shard_even_when_the_router_is_sure(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [1.0, 0.0])
    out = engine.search_vector(engine.query, SearchParams(k=1, probe_mass=1.0, max_probes=2))  # type: ignore[attr-defined]
    assert [p.category for p in out.probes] == [0, 1]
    assert out.results[0].item["sku"] == "z"


def test_k_and_min_score(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [0.5, 0.5])
    q = engine.query  # type: ignore[attr-defined]
    assert len(engine.search_vector(q, SearchParams(k=1, probe_mass=1.0, max_probes=2)).results) == 1
    out = engine.search_vector(q, SearchParams(k=10, min_score=0.85, probe_mass=1.0, max_probes=2))
    assert [h.item["sku"] for h in out.results] == ["z", "x"]


def test_explain_lists_image_hits(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [0.5, 0.5])
    out = engine.search_vector(engine.query, SearchParams(k=2, probe_mass=1.0, max_probes=2, explain=True))  # type: ignore[attr-defined]
    assert [h.item["image"] for h in out.image_hits] == ["z.jpg", "x1.jpg", "x2.jpg", "y.jpg"]
    assert len(out.results) == 2


def test_forced_category(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [0.99, 0.01])
    out = engine.search_vector(engine.query, SearchParams(k=10, category="b"))  # type: ignore[attr-defined]
    assert [h.item["sku"] for h in out.results] == ["z"] and out.forced_category
    with pytest.raises(UnknownCategory):
        engine.search_vector(engine.query, SearchParams(category="nope"))  # type: ignore[attr-defined]


def test_open_set_threshold_answers_no_match(tmp_path: Path) -> None:
    engine = _engine(tmp_path, [0.5, 0.5])
    engine.manifest = Manifest.model_construct(thresholds={"b": 0.99, "a": 0.5}, global_threshold=0.0)
    q = engine.query  # type: ignore[attr-defined]
    out = engine.search_vector(q, SearchParams(k=3, probe_mass=1.0, max_probes=2, open_set=True))
    assert not out.match and out.results == []  # top hit z (category b) scores 0.95 < 0.99
    out = engine.search_vector(q, SearchParams(k=3, probe_mass=1.0, max_probes=2, category="a", open_set=True))
    assert out.match and out.results[0].item["sku"] == "x"  # x scores 0.9 >= 0.5
    out = engine.search_vector(q, SearchParams(k=3, probe_mass=1.0, max_probes=2, min_score=-1.0, open_set=True))
    assert out.match and len(out.results) == 3  # an explicit min_score replaces the thresholds
