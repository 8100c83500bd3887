"""The search pipeline, independent of HTTP: decode -> embed -> route -> search shards -> group by SKU."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from app.artifacts.attributes import AttributeIndex
from app.artifacts.items import ItemTable
from app.artifacts.manifest import Manifest
from app.artifacts.shards import ShardIndex
from app.engine.batching import expecting
from app.engine.delta import Delta
from app.engine.embedding import Embedder, decode_side
from app.engine.filters import CompiledFilter, compile_filter, parse_filter
from app.engine.imaging import MAX_DECODE_BYTES, Collected, DecodeBudget, Region, collect_warnings, decode_image
from app.engine.pending import PendingShards
from app.engine.routing import Probe, Router, select_probes
from app.errors import InternalError, Overloaded, ServiceError, ShardUnavailable, UnknownCategory

STAGES = ("decode", "embed", "route", "search", "group")

MIN_FETCH = 64
OVERFETCH = 4  # images fetched per wanted SKU before grouping (the service's default; VPS_OVERFETCH)
# Shards added beyond the router's choice when it yields fewer than k SKUs (grocery: 81 SKUs in 43 categories,
# so a k above that searches all 43); an explicit min_score can make every shard come up short, hence a bound.
FILL_MAX_PROBES = 64
MAX_MASKED_FETCH = 4096  # rows a shard is asked for at most when masked rows crowd its answer
MAX_OFFSET = 499  # paging: results offset..offset+k of one ranking (Alibaba's Start is 0..499)
# Filtered search, by selectivity (docs/bench/bench_filters.md): a shard whose matching rows are few, or a small
# share of it, is scanned exactly (the rows' vectors read from the memory-mapped index); otherwise its graph is
# walked with the filter, as wide as ef_search / share (at most MAX_FILTER_EF), since a narrow walk over a graph
# whose nodes mostly fail the filter returns too few of the right ones.
EXACT_FILTER_ROWS = 4096
# A filter keeping at most this many rows in all is searched in every shard that holds any, exactly: no routing
# loss where it would hurt most (a few matching products spread over many categories), at a scan's cost.
EXACT_FILTER_TOTAL = 8192
EXACT_FILTER_SHARE = 0.25
MAX_EXACT_ROWS = 65536  # ...but never more rows than this (128 MiB of 512-d vectors) in one scan: the graph then
MAX_FILTER_EF = 2048
SKU_COLUMN = "sku"  # the build's SKU column among the attribute columns (app/artifacts/attributes.py)
FILTER_CACHE = 32  # compiled filters kept per engine (a shop sends the same few again and again)


@dataclass(frozen=True)
class SearchParams:
    k: int = 10
    category: str | None = None
    min_score: float | None = None
    probe_mass: float = 0.9
    max_probes: int = 3
    explain: bool = False
    open_set: bool = False  # apply the manifest's per-category thresholds (an explicit min_score overrides)
    fill_max_probes: int = FILL_MAX_PROBES  # shards added to fill k, at most (0: never fill)
    filter: str | None = None  # app/engine/filters.py
    offset: int = 0  # paging: results offset .. offset + k of the same ranking
    region: Region | None = None  # the part of the photo to search (app/engine/imaging.py)

    @property
    def depth(self) -> int:
        """How many SKUs the ranking needs: the page's and those before it."""
        return self.offset + self.k


@dataclass(frozen=True)
class SearchDefaults:
    """A deployment's defaults, between what a request asks and what the index build chose (the service fills
    them from its Settings: app/service/engines.py; offline jobs use these)."""

    k: int = 10
    probe_mass: float | None = None  # None: the manifest's
    max_probes: int | None = None  # None: the manifest's
    open_set: bool = False
    fill_max_probes: int = FILL_MAX_PROBES


def resolve_params(
    manifest: Manifest,
    defaults: SearchDefaults = SearchDefaults(),
    *,
    k: int | None = None,
    category: str | None = None,
    min_score: float | None = None,
    probe_mass: float | None = None,
    max_probes: int | None = None,
    explain: bool = False,
    filter: str | None = None,
    offset: int = 0,
    region: Region | None = None,
) -> SearchParams:
    """The one rule for which value wins: the request's, else the deployment's default, else the build's."""
    return SearchParams(
        k=k or defaults.k,
        category=category,
        min_score=min_score,
        probe_mass=probe_mass or defaults.probe_mass or manifest.probe_mass,
        max_probes=max_probes or defaults.max_probes or manifest.max_probes,
        explain=explain,
        open_set=defaults.open_set,
        fill_max_probes=defaults.fill_max_probes,
        filter=filter or None,
        offset=offset,
        region=region,
    )


def every_shard(params: SearchParams, n_shards: int) -> SearchParams:
    """The same search with every shard probed: the yardstick routing is measured against."""
    return replace(params, probe_mass=1.0, max_probes=n_shards)


@dataclass(frozen=True)
class Hit:
    row: int
    score: float
    item: dict[str, Any]


@dataclass
class SearchOutcome:
    results: list[Hit]
    probes: list[Probe]  # the router's choice (or the forced category)
    forced_category: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    image_hits: list[Hit] = field(default_factory=list)
    top_probability: float = 0.0
    match: bool = True
    added: list[Probe] = field(default_factory=list)  # searched beyond the router's choice to fill k
    vector: np.ndarray | None = None  # the query's embedding (shadow search re-runs it with every shard)
    top_score: float | None = None  # the best hit's score, also when the open-set threshold refused it
    live: list[str] = field(default_factory=list)  # categories only live changes hold (searched whole, unrouted)


@dataclass
class Shard:
    name: str
    offset: int
    index: ShardIndex
    n_skus: int = 1  # distinct SKUs in the shard (the manifest's count): how many fill probes k needs


@dataclass
class Candidates:
    """Image-level hits of the shards searched so far: base rows (>= 0, global item rows) and live delta rows
    (< 0: row -1 - i is `live[i]`), with their scores; `delta` is the one snapshot the whole request reads."""

    delta: Delta
    filter: CompiledFilter | None = None
    allowed: np.ndarray | None = None  # rows the search may return (the filter's, less changed SKUs'), when set
    rows: list[np.ndarray] = field(default_factory=list)
    scores: list[np.ndarray] = field(default_factory=list)
    live: list[dict[str, Any]] = field(default_factory=list)
    masked: int = 0  # base hits the last grouping skipped: their SKU changed since the version

    def add_live(self, items: list[dict[str, Any]], scores: np.ndarray) -> None:
        if items:
            first = len(self.live)
            self.live += items
            self.rows.append(-1 - np.arange(first, first + len(items), dtype=np.int64))
            self.scores.append(scores)


class SearchEngine:
    """Everything one index version needs to answer queries. Immutable once built but for `delta`, a reference to an
    immutable snapshot that the catalogue follower replaces whole (a request reads it once); safe across threads."""

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
        max_decode_bytes: int = MAX_DECODE_BYTES,
        decode_budget: DecodeBudget | None = None,
        attributes: AttributeIndex | None = None,
        ef_search: int | None = None,
    ) -> None:
        self.embedder = embedder
        self.router = router
        self.shards = shards
        self.items = items
        self.manifest = manifest
        self.max_image_pixels = max_image_pixels
        self.max_decode_bytes = max_decode_bytes
        self.decode_budget = decode_budget  # shared by every engine of the process (reloads keep it)
        self.overfetch = overfetch
        self._category_index = {s.name: i for i, s in enumerate(shards)}
        self.categories: list[str] = [s.name for s in shards]  # shard i holds category i (read per request)
        # Live catalogue changes after the version's sequence number: replaced whole by the follower
        # (app/catalogue/follow.py); a request reads the reference once.
        self.delta = Delta.empty(manifest.catalogue_seq or 0)
        self.attributes = attributes or AttributeIndex.empty(len(items))
        self.ef_search = ef_search or 64  # the shards' efSearch (assemble passes it; 64 is faiss's default)
        self.exact_filter_rows = EXACT_FILTER_ROWS  # a shard with at most this many matching rows is scanned
        self._filters: OrderedDict[str, CompiledFilter] = OrderedDict()
        self._filters_lock = threading.Lock()
        self._hidden: tuple[Delta, np.ndarray] | None = None  # hidden_rows of the last delta snapshot asked
        # Shards still to verify and load (app/engine/pending.py), or None: all were before the engine existed.
        self.pending: PendingShards | None = None

    def category_id(self, name: str) -> int:
        try:
            return self._category_index[name]
        except KeyError:
            raise UnknownCategory("unknown category; GET /v1/info lists the categories of the live index") from None

    def compile_filter(self, text: str) -> CompiledFilter:
        """The filter as a mask over this version's rows (parse and key errors: 422), cached by its canonical
        form (spacing and keyword case make no new entry; a parse is microseconds, a mask over 1M rows ms)."""
        parsed = parse_filter(text)
        key = parsed.canonical
        with self._filters_lock:
            hit = self._filters.get(key)
            if hit is not None:
                self._filters.move_to_end(key)
                return hit
        compiled = compile_filter(
            parsed, self.attributes, self.categories, [(s.offset, s.index.ntotal) for s in self.shards]
        )
        with self._filters_lock:
            self._filters[key] = compiled
            while len(self._filters) > FILTER_CACHE:
                self._filters.popitem(last=False)
        return compiled

    def check_category(self, name: str, delta: Delta) -> None:
        if name not in self._category_index and name not in delta.segments:
            self.category_id(name)  # raises

    def embed_image(
        self, data: bytes, warnings: Collected | None = None, region: Region | None = None
    ) -> tuple[np.ndarray, dict[str, float]]:
        """Decode and embed; library warnings the decode raises go to `warnings` (counted, never printed)."""
        with expecting(self.embedder, 1):
            t0 = time.perf_counter()
            batch = self.embedder.preprocess(self.decode(data, warnings, region))[None]
            t1 = time.perf_counter()
            vector = self.checked(self.embedder.embed(batch), 1)[0]
            t2 = time.perf_counter()
        return vector, {"decode": t1 - t0, "embed": t2 - t1}

    def decode(self, data: bytes, warnings: Collected | None = None, region: Region | None = None) -> Image.Image:
        with collect_warnings(warnings):
            return decode_image(
                data,
                max_pixels=self.max_image_pixels,
                min_side=decode_side(self.embedder.card.input),
                max_decode_bytes=self.max_decode_bytes,
                budget=self.decode_budget,
                region=region,
            )

    def checked(self, vectors: np.ndarray, n: int) -> np.ndarray:
        if vectors.shape != (n, self.embedder.dim) or not np.isfinite(vectors).all():
            raise InternalError("the embedder returned a malformed or non-finite vector")  # NaN never reaches JSON
        return vectors

    def search_image(self, data: bytes, params: SearchParams, warnings: Collected | None = None) -> SearchOutcome:
        if params.category is not None:
            self.check_category(params.category, self.delta)  # reject an unknown category before inference
        if params.filter is not None:
            self.compile_filter(params.filter)  # and a bad filter (compiled once: the search finds it cached)
        vector, timings = self.embed_image(data, warnings, params.region)
        outcome = self.search_vector(vector, params)
        outcome.timings_s = {**timings, **outcome.timings_s}
        outcome.vector = vector
        return outcome

    def search_images(
        self, images: Sequence[bytes], params: SearchParams, warnings: Collected | None = None
    ) -> list[SearchOutcome | ServiceError]:
        """A batch: each image decoded on its own (a bad one becomes its error, the others go on), the good ones
        embedded in one inference call, then searched one by one. Outcomes in the order of `images`; decode and
        embed times are the batch's, shared equally."""
        if params.category is not None:
            self.check_category(params.category, self.delta)
        if params.filter is not None:
            self.compile_filter(params.filter)
        t0 = time.perf_counter()
        decoded: list[np.ndarray | ServiceError] = []
        for data in images:
            try:
                decoded.append(self.embedder.preprocess(self.decode(data, warnings, params.region)))
            except Overloaded:
                raise  # the process is out of decode memory: the whole batch is refused (503, retry)
            except ServiceError as exc:
                decoded.append(exc)
        t1 = time.perf_counter()
        good = [d for d in decoded if isinstance(d, np.ndarray)]
        vectors: list[np.ndarray] = list(self.checked(self.embedder.embed(np.stack(good)), len(good))) if good else []
        t2 = time.perf_counter()
        shared = {"decode": (t1 - t0) / max(1, len(images)), "embed": (t2 - t1) / max(1, len(good))}
        found = iter(vectors)
        out: list[SearchOutcome | ServiceError] = []
        for d in decoded:
            if isinstance(d, ServiceError):
                out.append(d)
                continue
            vector = next(found)
            try:
                outcome = self.search_vector(vector, params)
            except ShardUnavailable as exc:  # a shard this image routes to failed its hash: this image's error
                out.append(exc)
                continue
            outcome.timings_s = {**shared, **outcome.timings_s}
            outcome.vector = vector
            out.append(outcome)
        return out

    def search_vector(self, vector: np.ndarray, params: SearchParams) -> SearchOutcome:
        """route -> search the chosen shards (and their live delta) -> group by SKU; while fewer than k SKUs,
        search the next shards in probability order (fill, at most `fill_max_probes`) and group again; then the
        open-set threshold."""
        query = np.ascontiguousarray(vector[None], dtype=np.float32)
        clock = _Clock()
        flt = self.compile_filter(params.filter) if params.filter is not None else None
        candidates = Candidates(self.delta, flt)
        probs, probes, live = self.route(vector, params, candidates.delta)
        if flt is not None and probs is not None and flt.matching <= EXACT_FILTER_TOTAL:
            # Every shard holding a matching base row, or live rows (checked against the filter when searched).
            live_in = candidates.delta.segments
            probes = [
                Probe(int(i), float(probs[i]))
                for i in np.argsort(-probs, kind="stable")
                if flt.per_shard[i] or self.shards[int(i)].name in live_in
            ]
        clock.lap("route")
        self.search(query, probes, params, candidates)
        self.search_live(query, live, params, candidates)
        clock.lap("search")
        results, image_hits = self.group(candidates, params)
        clock.lap("group")
        if candidates.masked and len(results) < params.depth:
            # Rows of SKUs changed since the version filled the fetch (a SKU moved away with many photos): the
            # same shards again without them. Only then: excluding them up front would cost every query.
            candidates, results, image_hits = self.search_unmasked(query, probes, live, params, candidates)
            clock.lap("search")
        added: list[Probe] = []
        while probs is not None and len(results) < params.depth:
            more = self.fill_probes(probs, probes, added, len(results), params, flt, candidates.delta)
            if not more:
                break
            self.search(query, more, params, candidates)
            clock.lap("search")
            results, image_hits = self.group(candidates, params)
            added += more
            clock.lap("group")
        top_score = results[0].score if results else None
        ranking = self.open_set(results, params)
        clock.lap("group")
        return SearchOutcome(
            results=ranking[params.offset : params.depth],
            probes=probes,
            forced_category=probs is None,
            timings_s=clock.totals,
            image_hits=image_hits,
            top_probability=probes[0].probability if probes else 1.0,
            match=bool(ranking),
            added=added,
            top_score=top_score,
            live=live,
        )

    def route(
        self, vector: np.ndarray, params: SearchParams, delta: Delta
    ) -> tuple[np.ndarray | None, list[Probe], list[str]]:
        """The router's probabilities, its choice of shards, and the categories only live changes hold (the
        router has never seen them: searched whole until compaction). A forced category: no probabilities, that
        one (a shard, or a live-only category)."""
        if params.category is not None:
            if params.category not in self._category_index and params.category in delta.segments:
                return None, [], [params.category]
            return None, [Probe(self.category_id(params.category), 1.0)], []
        probs = self.router.probabilities(vector)
        if not np.isfinite(probs).all():
            raise InternalError("the router produced non-finite probabilities")
        live = [c for c in delta.segments if c not in self._category_index]
        return probs, select_probes(probs, probe_mass=params.probe_mass, max_probes=params.max_probes), live

    def search_unmasked(
        self, query: np.ndarray, probes: list[Probe], live: list[str], params: SearchParams, before: Candidates
    ) -> tuple[Candidates, list[Hit], list[Hit]]:
        """The probed shards searched again with the changed SKUs' rows excluded from the search itself (the
        version's SKU column; `filter`'s machinery); a version without that column asks for four times as many
        rows instead, up to MAX_MASKED_FETCH."""
        hidden = self.hidden_rows(before.delta)
        if hidden is not None:
            allowed = ~hidden if before.filter is None else before.filter.mask & ~hidden
            candidates = Candidates(before.delta, before.filter, allowed=allowed)
            self.search(query, probes, params, candidates)
            self.search_live(query, live, params, candidates)
            results, image_hits = self.group(candidates, params)
            return candidates, results, image_hits
        want = self.fetch_size(params)
        candidates = before
        results, image_hits = self.group(candidates, params)
        while candidates.masked and len(results) < params.depth and want < MAX_MASKED_FETCH:
            want *= 4
            candidates = Candidates(before.delta, before.filter)
            self.search(query, probes, params, candidates, want)
            self.search_live(query, live, params, candidates, want)
            results, image_hits = self.group(candidates, params)
        return candidates, results, image_hits

    def hidden_rows(self, delta: Delta) -> np.ndarray | None:
        """Rows (bool, one per item row) of the SKUs `delta` holds, which changed since the version; None when
        the version has no SKU column (built before it). Kept for the last snapshot asked about."""
        cached = self._hidden
        if cached is not None and cached[0] is delta:
            return cached[1]
        column = self.attributes.columns.get(SKU_COLUMN)
        if column is None or column.kind != "string":
            return None
        codes = np.asarray([c for sku in delta.products if (c := column.code(sku)) >= 0], dtype=np.int32)
        hidden = np.isin(column.data, codes)
        self._hidden = (delta, hidden)
        return hidden

    def fill_probes(
        self,
        probs: np.ndarray,
        chosen: list[Probe],
        added: list[Probe],
        found: int,
        params: SearchParams,
        flt: CompiledFilter | None = None,
        delta: Delta | None = None,
    ) -> list[Probe]:
        """The next shards in probability order whose SKU counts cover the SKUs still missing, within the fill
        bound; with a filter, only shards holding matching rows (their SKUs counted in proportion). Empty when
        the bound is reached or every shard has been searched."""
        searched = {p.category for p in chosen} | {p.category for p in added}
        budget = params.fill_max_probes - len(added)
        missing = params.depth - found
        more: list[Probe] = []
        for idx in np.argsort(-probs, kind="stable"):
            if missing <= 0 or len(more) >= budget:
                break
            i = int(idx)
            if i in searched:
                continue
            shard = self.shards[i]
            skus = shard.n_skus
            if flt is not None:
                live = (delta or self.delta).segments  # the request's snapshot (search_vector passes it)
                if flt.per_shard[i] == 0 and shard.name not in live:
                    continue  # nothing here can match (its live rows, if any, are checked when searched)
                skus = round(skus * flt.per_shard[i] / max(1, shard.index.ntotal))
            more.append(Probe(i, float(probs[idx])))
            missing -= max(1, skus)
        return more

    def search(
        self, query: np.ndarray, probes: list[Probe], params: SearchParams, into: Candidates, want: int = 0
    ) -> None:
        """Search each probed shard, adding its hits (as global item rows) to `into`.

        Over-fetch images so that grouping by SKU still leaves k distinct SKUs. A floor too: SKUs with many
        near-identical photos can fill k * overfetch slots (grocery val over HTTP, k=5: recall@5 0.966 with 20
        images a shard, 0.976 with 64), and HNSW visits efSearch (default 64) candidates anyway."""
        want = want or self.fetch_size(params)
        keep = into.filter.matches if into.filter is not None else None
        for probe in probes:
            shard = self.shards[probe.category]
            if into.allowed is not None:
                rows = into.allowed[shard.offset : shard.offset + shard.index.ntotal]
                d, i = self.search_shard(probe.category, query, want, rows, int(np.count_nonzero(rows)))
            elif into.filter is not None:
                rows = into.filter.mask[shard.offset : shard.offset + shard.index.ntotal]
                exact = into.filter.matching <= EXACT_FILTER_TOTAL
                d, i = self.search_shard(
                    probe.category, query, want, rows, into.filter.per_shard[probe.category], exact
                )
            else:
                d, i = self.search_shard(probe.category, query, want)
            valid = i >= 0
            into.rows.append(i[valid] + shard.offset)
            into.scores.append(d[valid])
            into.add_live(*into.delta.search(shard.name, query, want, keep))

    def search_shard(
        self,
        category: int,
        query: np.ndarray,
        want: int,
        allowed: np.ndarray | None = None,
        matching: int = 0,
        exact: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One shard's best `want` images (scores, local ids); with `allowed` (bool per local id, `matching` of
        them true: a filter's rows), only those: exact over few, else the graph walked with the filter."""
        shard = self.shards[category]
        n = shard.index.ntotal
        if allowed is None:
            d, i = shard.index.search(query, min(want, n))
            return d[0], i[0]
        if matching == 0:
            return np.empty(0, np.float32), np.empty(0, np.int64)
        share = matching / n
        if exact or matching <= self.exact_filter_rows or (share < EXACT_FILTER_SHARE and matching <= MAX_EXACT_ROWS):
            ids = np.flatnonzero(allowed)
            scores = shard.index.rows(ids) @ query[0]
            if len(ids) > want:
                top = np.argpartition(-scores, want - 1)[:want]
                ids, scores = ids[top], scores[top]
            return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)
        ef = min(MAX_FILTER_EF, max(self.ef_search, int(np.ceil(self.ef_search / share))))
        d, i = shard.index.search_subset(query, min(want, matching), allowed, ef)
        return d[0], i[0]

    def search_live(
        self, query: np.ndarray, categories: list[str], params: SearchParams, into: Candidates, want: int = 0
    ) -> None:
        want = want or self.fetch_size(params)
        keep = into.filter.matches if into.filter is not None else None
        for name in categories:
            into.add_live(*into.delta.search(name, query, want, keep))

    def fetch_size(self, params: SearchParams) -> int:
        return max(params.depth * self.overfetch, MIN_FETCH)

    def group(self, candidates: Candidates, params: SearchParams) -> tuple[list[Hit], list[Hit]]:
        """One result per SKU (its best image), best first, at most k, none below min_score; with `explain`,
        also every image hit."""
        rows = np.concatenate(candidates.rows) if candidates.rows else np.empty(0, dtype=np.int64)
        scores = np.concatenate(candidates.scores) if candidates.scores else np.empty(0, dtype=np.float32)
        results: list[Hit] = []
        image_hits: list[Hit] = []
        seen: set[str] = set()
        candidates.masked = 0
        for j in np.argsort(-scores, kind="stable"):
            score = float(scores[j])
            if not np.isfinite(score):
                continue
            if params.min_score is not None and score < params.min_score:
                break  # sorted: nothing later passes either
            row = int(rows[j])
            if row >= 0:
                hit = Hit(row, score, self.items.get(row))
                if candidates.delta.masks(str(hit.item["sku"])):
                    candidates.masked += 1
                    continue  # changed since the version was built: its live rows speak for it
            else:
                hit = Hit(row, score, candidates.live[-1 - row])
            if params.explain:
                image_hits.append(hit)
            sku = str(hit.item["sku"])
            if sku in seen:
                continue
            seen.add(sku)
            results.append(hit)
            if len(results) >= params.depth and not params.explain:
                break
        return results[: params.depth], image_hits

    def open_set(self, results: list[Hit], params: SearchParams) -> list[Hit]:
        """No results when the best hit scores below its category's threshold (an unknown product)."""
        if results and params.min_score is None and params.open_set:
            top = results[0]
            if top.score < self.manifest.threshold(str(top.item["category"])):
                return []
        return results


class _Clock:
    """Seconds per stage; a stage entered more than once (filling k searches and groups again) adds up."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.totals[stage] = self.totals.get(stage, 0.0) + now - self._last
        self._last = now
