"""`vps mine`: which unlabelled photos a label would teach the most, found by vector search.

Each photo is embedded and searched as the service would (routing, fill, every SKU's best image), then scored on
three signals, each in 0..1 where 1 is "a label teaches a lot":

- `margin`: the top two SKUs score almost the same (1 - (s1 - s2) / MARGIN_SCALE): the index cannot tell them
  apart, so the label separates two products;
- `router`: the router is unsure (1 - its top probability), or the category it puts first is not the category
  of the nearest catalogue images (then 1): the label corrects a routing mistake before it hides a product;
- `novel`: far from every catalogue image (the top score from NOVEL_HIGH down to NOVEL_LOW maps to 0..1): maybe
  a product not sold yet.

The priority is the largest signal (the reason names it). Photos are then taken best first, skipping any whose
embedding is within DUPLICATE_COSINE of one already taken (a faiss inner-product index of the queue so far): a
burst of shots of one shelf is one case, not ten. The budget bounds the queue.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from app.engine.search import SearchEngine, SearchOutcome, SearchParams
from app.errors import ServiceError
from app.offline.progress import progress

log = logging.getLogger(__name__)

MARGIN_SCALE = 0.1  # a top-two score gap of this or more counts as confident
NOVEL_HIGH, NOVEL_LOW = 0.8, 0.5  # a top score above NOVEL_HIGH is near the catalogue; below NOVEL_LOW, far
DUPLICATE_COSINE = 0.97  # photos closer than this are one case (burst shots of one shelf)
QUEUE_COLUMNS = [
    "photo",
    "suggested_sku",
    "suggested_category",
    "reason",
    "priority",
    "margin",
    "top_score",
    "second_sku",
    "second_score",
    "router_category",
    "router_probability",
    "neighbour_category",
    "sku",
]


@dataclass
class Candidate:
    photo: str  # as given (a path relative to the pool's root, or the CSV's image column)
    vector: np.ndarray
    outcome: SearchOutcome
    signals: dict[str, float] = field(default_factory=dict)

    @property
    def priority(self) -> float:
        return max(self.signals.values()) if self.signals else 0.0

    @property
    def reason(self) -> str:
        return max(self.signals, key=lambda k: self.signals[k]) if self.signals else "none"


@dataclass(frozen=True)
class MineResult:
    queue: list[Candidate]
    seen: int
    failed: list[tuple[str, str]]  # (photo, error code)
    duplicates: int


def score(outcome: SearchOutcome, engine: SearchEngine) -> dict[str, float]:
    """The three signals of one searched photo (module docstring)."""
    results = outcome.results
    if not results:
        return {"novel": 1.0}
    s1 = results[0].score
    s2 = results[1].score if len(results) > 1 else -1.0
    margin = float(np.clip(1.0 - (s1 - s2) / MARGIN_SCALE, 0.0, 1.0))
    novel = float(np.clip((NOVEL_HIGH - s1) / (NOVEL_HIGH - NOVEL_LOW), 0.0, 1.0))
    router = 1.0 - outcome.top_probability
    if outcome.probes and neighbour_category(outcome) != engine.categories[outcome.probes[0].category]:
        router = 1.0
    return {"margin": round(margin, 4), "router": round(router, 4), "novel": round(novel, 4)}


def neighbour_category(outcome: SearchOutcome) -> str | None:
    """The category most of the nearest images hold (the image-level hits, best first; ties: the best's)."""
    hits = outcome.image_hits[:10] or outcome.results[:10]
    if not hits:
        return None
    counts: dict[str, int] = {}
    for h in hits:
        c = str(h.item["category"])
        counts[c] = counts.get(c, 0) + 1
    best = max(counts.values())
    return next(str(h.item["category"]) for h in hits if counts[str(h.item["category"])] == best)


def mine(
    engine: SearchEngine,
    photos: Sequence[tuple[str, bytes]],
    budget: int,
    *,
    k: int = 5,
    duplicate_cosine: float = DUPLICATE_COSINE,
    show_progress: bool = False,
) -> MineResult:
    """Search every photo, score it, and take the best `budget` distinct ones."""
    params = mining_params(engine, k)
    candidates: list[Candidate] = []
    failed: list[tuple[str, str]] = []
    for name, data in progress(photos, desc="mine", unit="photo", enabled=show_progress):
        try:
            outcome = engine.search_image(data, params)
        except ServiceError as exc:
            failed.append((name, exc.code))
            continue
        assert outcome.vector is not None  # noqa: S101 - search_image always sets it
        candidates.append(Candidate(name, outcome.vector, outcome, score(outcome, engine)))
    queue, duplicates = select(candidates, budget, duplicate_cosine)
    return MineResult(queue, len(photos), failed, duplicates)


def mine_vectors(
    engine: SearchEngine,
    vectors: Sequence[tuple[str, np.ndarray]],
    budget: int,
    *,
    k: int = 5,
    duplicate_cosine: float = DUPLICATE_COSINE,
) -> MineResult:
    """`mine` over photos already embedded with the engine's model (measurements re-use one embedding)."""
    params = mining_params(engine, k)
    candidates = []
    for name, v in vectors:
        outcome = engine.search_vector(v, params)
        candidates.append(Candidate(name, v, outcome, score(outcome, engine)))
    queue, duplicates = select(candidates, budget, duplicate_cosine)
    return MineResult(queue, len(vectors), [], duplicates)


def mining_params(engine: SearchEngine, k: int) -> SearchParams:
    """The service's routing (the build's policy), every image hit kept for the neighbours' categories."""
    return SearchParams(k=k, probe_mass=engine.manifest.probe_mass, max_probes=engine.manifest.max_probes, explain=True)


def select(candidates: list[Candidate], budget: int, duplicate_cosine: float) -> tuple[list[Candidate], int]:
    """Best priority first, skipping near-duplicates of what is already queued; returns the queue and how many
    duplicates were skipped."""
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].priority, candidates[i].photo))
    if not candidates:
        return [], 0
    taken = faiss.IndexFlatIP(int(candidates[0].vector.shape[0]))
    queue: list[Candidate] = []
    duplicates = 0
    for i in order:
        if len(queue) >= budget:
            break
        v = np.ascontiguousarray(candidates[i].vector[None], dtype=np.float32)
        if taken.ntotal:
            d, _ = taken.search(v, 1)
            if float(d[0, 0]) >= duplicate_cosine:
                duplicates += 1
                continue
        taken.add(v)
        queue.append(candidates[i])
    return queue, duplicates


def queue_rows(queue: Iterable[Candidate], engine: SearchEngine) -> list[dict[str, Any]]:
    rows = []
    for c in queue:
        res = c.outcome.results
        top = res[0] if res else None
        second = res[1] if len(res) > 1 else None
        probe = c.outcome.probes[0] if c.outcome.probes else None
        rows.append(
            {
                "photo": c.photo,
                "suggested_sku": str(top.item["sku"]) if top else "",
                "suggested_category": str(top.item["category"]) if top else "",
                "reason": c.reason,
                "priority": round(c.priority, 4),
                "margin": round(top.score - second.score, 4) if top and second else "",
                "top_score": round(top.score, 4) if top else "",
                "second_sku": str(second.item["sku"]) if second else "",
                "second_score": round(second.score, 4) if second else "",
                "router_category": engine.categories[probe.category] if probe else "",
                "router_probability": round(probe.probability, 4) if probe else "",
                "neighbour_category": neighbour_category(c.outcome) or "",
                "sku": "",  # the labeller fills this in (vps label import reads it)
            }
        )
    return rows


def write_queue(rows: list[dict[str, Any]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=QUEUE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
