"""The search pipeline, independent of HTTP: decode -> embed -> route -> search shards -> group by SKU."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.embedding import Embedder, decode_side
from app.errors import InternalError, UnknownCategory
from app.imaging import decode_image
from app.index.items import ItemTable
from app.index.manifest import Manifest
from app.index.shards import ShardIndex
from app.router import Probe, Router, select_probes

STAGES = ("decode", "embed", "route", "search", "group")
MIN_FETCH = 64


@dataclass(frozen=True)
class SearchParams:
    k: int = 10
    category: str | None = None
    min_score: float | None = None
    probe_mass: float = 0.9
    max_probes: int = 3
    explain: bool = False
    open_set: bool = False  # apply the manifest's per-category thresholds (an explicit min_score overrides)


@dataclass(frozen=True)
class Hit:
    row: int
    score: float
    item: dict[str, Any]


@dataclass
class SearchOutcome:
    results: list[Hit]
    probes: list[Probe]
    forced_category: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    image_hits: list[Hit] = field(default_factory=list)
    top_probability: float = 0.0
    match: bool = True


@dataclass
class Shard:
    name: str
    offset: int
    index: ShardIndex


class SearchEngine:
    """Everything one index version needs to answer queries. Immutable once built; safe across threads."""

    def __init__(
        self,
        *,
        embedder: Embedder,
        router: Router,
        shards: list[Shard],
        items: ItemTable,
        manifest: Manifest,
        max_image_pixels: int,
        overfetch: int,
    ) -> None:
        self.embedder = embedder
        self.router = router
        self.shards = shards
        self.items = items
        self.manifest = manifest
        self.max_image_pixels = max_image_pixels
        self.overfetch = overfetch
        self._category_index = {s.name: i for i, s in enumerate(shards)}
        self.categories: list[str] = [s.name for s in shards]  # shard i holds category i (read per request)

    def category_id(self, name: str) -> int:
        try:
            return self._category_index[name]
        except KeyError:
            raise UnknownCategory("unknown category; GET /v1/info lists the categories of the live index") from None

    def embed_image(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        t0 = time.perf_counter()
        image = decode_image(data, max_pixels=self.max_image_pixels, min_side=decode_side(self.embedder.card.input))
        batch = self.embedder.preprocess(image)[None]
        t1 = time.perf_counter()
        vector = self.embedder.embed(batch)[0]
        if vector.shape != (self.embedder.dim,) or not np.isfinite(vector).all():
            raise InternalError("the embedder returned a malformed or non-finite vector")  # NaN never reaches JSON
        t2 = time.perf_counter()
        return vector, {"decode": t1 - t0, "embed": t2 - t1}

    def search_image(self, data: bytes, params: SearchParams) -> SearchOutcome:
        if params.category is not None:
            self.category_id(params.category)  # reject an unknown category before paying for inference
        vector, timings = self.embed_image(data)
        outcome = self.search_vector(vector, params)
        outcome.timings_s = {**timings, **outcome.timings_s}
        return outcome

    def search_vector(self, vector: np.ndarray, params: SearchParams) -> SearchOutcome:
        t0 = time.perf_counter()
        if params.category is not None:
            probes = [Probe(self.category_id(params.category), 1.0)]
            forced = True
            top_probability = 1.0
        else:
            probs = self.router.probabilities(vector)
            if not np.isfinite(probs).all():
                raise InternalError("the router produced non-finite probabilities")
            probes = select_probes(probs, probe_mass=params.probe_mass, max_probes=params.max_probes)
            forced = False
            top_probability = probes[0].probability
        t1 = time.perf_counter()

        # Over-fetch images so that grouping by SKU still leaves k distinct SKUs. A floor too: SKUs with many
        # near-identical photos can fill k * overfetch slots (grocery val over HTTP, k=5: recall@5 0.966 with 20
        # images a shard, 0.976 with 64), and HNSW visits efSearch (default 64) candidates anyway.
        want = max(params.k * self.overfetch, MIN_FETCH)
        rows: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        query = vector[None].astype(np.float32)
        for probe in probes:
            shard = self.shards[probe.category]
            kk = min(want, shard.index.ntotal)
            d, i = shard.index.search(query, kk)
            valid = i[0] >= 0
            rows.append(i[0][valid] + shard.offset)
            scores.append(d[0][valid])
        all_rows = np.concatenate(rows) if rows else np.empty(0, dtype=np.int64)
        all_scores = np.concatenate(scores) if scores else np.empty(0, dtype=np.float32)
        order = np.argsort(-all_scores, kind="stable")
        t2 = time.perf_counter()

        results: list[Hit] = []
        image_hits: list[Hit] = []
        seen: set[str] = set()
        for j in order:
            score = float(all_scores[j])
            if not np.isfinite(score):
                continue
            if params.min_score is not None and score < params.min_score:
                break  # sorted: nothing later passes either
            hit = Hit(int(all_rows[j]), score, self.items.get(int(all_rows[j])))
            if params.explain:
                image_hits.append(hit)
            sku = str(hit.item["sku"])
            if sku in seen:
                continue
            seen.add(sku)
            results.append(hit)
            if len(results) >= params.k and not params.explain:
                break
        results = results[: params.k]
        if results and params.min_score is None and params.open_set:
            top = results[0]
            threshold = self.manifest.thresholds.get(str(top.item["category"]), self.manifest.global_threshold)
            if top.score < threshold:
                results = []  # nothing in the catalogue is close enough: an unknown product
        t3 = time.perf_counter()
        return SearchOutcome(
            results=results,
            probes=probes,
            forced_category=forced,
            timings_s={"route": t1 - t0, "search": t2 - t1, "group": t3 - t2},
            image_hits=image_hits,
            top_probability=top_probability,
            match=bool(results),
        )
