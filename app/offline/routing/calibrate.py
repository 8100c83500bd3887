"""Train and calibrate the category router at build time, and choose the probing policy and open-set thresholds
from measurements on query photos: real ones (`--calibration-queries`) when given, else held-out groups of the
catalogue's own photos.

Held-out groups: each SKU's photos are grouped into near-duplicates (connected components of cosine >=
`near_duplicate_cosine`), and whole groups are held out. Catalogues are often burst shots: holding out single
photos (the first version held out the last 20 % of each SKU) leaves a near-copy of every query in the fitting
part. Grocery, grocery-lite0-ms512, train catalogue, linear router: router top-1 0.995 on the last 20 %; on groups at
cosine 0.85, 0.81-0.92 for one draw (by seed) and 0.873 for three draws pooled; the val photos give 0.841. The
prototype router (the default) measures 0.865 on the pooled groups and 0.865 on val (docs/routing.md). That model
was trained on those very photos, so no split of them is unseen: the build detects this from the model card's
list of training images and says so (`queries_seen_in_training`), beside the card's own figure on unseen photos.

- Temperature: fitted on the query photos with the router trained on the rest (then the router is refitted on
  everything and keeps that temperature).
- Probing policy: the smallest probe_mass whose routed recall@1 and recall@5 each lose <= `max_loss` against
  exhaustive search, both by exact search and as the service answers k=1 and k=5 (filling to k); recorded with
  the losses and mean shards chosen. Every shard instead (probe_mass 1, max_probes = categories) when no
  candidate keeps the loss within `max_probes`, when too few photos can be measured, or when the index is small
  enough that searching all of it costs little; `policy_reason` says which.
- Open set: unknown products are simulated by searching each query photo with its own SKU removed. Per
  category (of the top hit), the lowest top-1 score threshold whose accepted answers reach `target_precision`;
  categories with too few samples use the global threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np

from app.engine.routing import FittedRouter, select_probes
from app.offline.evaluate.metrics import top_skus
from app.offline.routing.fit import PROTOTYPES_PER_CATEGORY, RouterKind, fit_router, fit_temperature

PROBE_MASS_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
# Grocery, grocery-lite0-ms512: groups at 0.85 leave held-out photos at a mean nearest-neighbour cosine of 0.77 to the
# fitting part (val photos: 0.82; the last-20 % split: 0.93), so the held-out photos are no nearer than real ones.
NEAR_DUPLICATE_COSINE = 0.85
# Photos of one SKU grouped at most (the grouping is quadratic in them); the rest stay in the fitting part.
MAX_GROUPED_PER_SKU = 2000
# Fewer measured photos than this: the router's figures are noise, so every shard is searched.
MIN_POLICY_QUERIES = 30
# An index this small is searched whole: the demo (486 vectors in 43 HNSW shards) costs 0.63 ms a query for every
# shard (docs/bench/bench_shadow.md), beside ~12 ms of embedding. Both bounds: the cost grows with the shards.
EXHAUSTIVE_BELOW_VECTORS = 1000
EXHAUSTIVE_BELOW_SHARDS = 64
# Held-out groups are drawn this many times (different groups out) and the figures pooled: one draw's router
# top-1 on grocery ranged 0.81-0.92 over seeds (val: 0.84), as whichever large burst is held out dominates.
HOLDOUT_REPEATS = 3
# Recall@1 is measured as the service answers k=1 (the chosen shards alone: they hold at least one SKU) and
# recall@5 as it answers k=5 (the chosen shards, then more in probability order until they hold 5 SKUs).
FILL_K = 5


@dataclass
class RouterReport:
    kind: str
    temperature: float
    fallback_categories: list[str]
    calibration_queries: int  # held-out catalogue photos, or the --calibration-queries photos
    router_top1: float
    router_top3: float
    probe_mass: float
    max_probes: int
    exhaustive_recall1: float
    routed_recall1: float
    routing_loss_points: float
    mean_shards: float
    candidates: list[dict[str, float]] = field(default_factory=list)
    target_precision: float = 0.9
    global_threshold: float = -1.0
    thresholds: dict[str, float] = field(default_factory=dict)
    # Open-set samples per category, and the categories that use `global_threshold` instead of their own (fewer
    # than `min_threshold_samples` samples, or the target precision not reached).
    threshold_samples: dict[str, int] = field(default_factory=dict)
    threshold_fallback: list[str] = field(default_factory=list)
    min_threshold_samples: int = 20
    calibration_source: str = ""
    policy_reason: str = ""
    routing_loss5_points: float = 0.0
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE
    # Fraction of the measured photos the model was trained on (None: the model card lists no training images).
    queries_seen_in_training: float | None = None
    model_card_unseen_top1: float | None = None  # the card's router top-1 on photos the model never saw

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: what the build measured, on what, and what it chose."""
        line = (
            f"router top-1 {self.router_top1:.3f} over {self.calibration_queries} measured photos "
            f"({self.calibration_source}); "
            f"probing {self.policy_label()}: {self.mean_shards:.3f} shards a query before filling to k, routing loss "
            f"{self.routing_loss_points:.3f} points of recall@1 and {self.routing_loss5_points:.3f} of recall@5 "
            f"({self.policy_reason})"
        )
        if self.queries_seen_in_training:
            line += f"; {100 * self.queries_seen_in_training:.1f} % of those photos were in the model's training set"
            if self.model_card_unseen_top1 is not None:
                line += f" (its card: top-1 {self.model_card_unseen_top1:.3f} on photos it never saw)"
        return line

    def policy_label(self) -> str:
        if self.probe_mass >= 1.0:
            return f"every shard ({self.max_probes})"
        return f"probe_mass {self.probe_mass:g}, max_probes {self.max_probes}"


def near_duplicate_groups(x: np.ndarray, cosine: float) -> np.ndarray:
    """Group label per row: connected components of the graph joining rows whose cosine >= `cosine`."""
    adjacent = (x @ x.T) >= cosine
    label = np.full(len(x), -1)
    group = 0
    for i in range(len(x)):
        if label[i] >= 0:
            continue
        label[i] = group
        frontier = np.array([i])
        while len(frontier):
            frontier = np.flatnonzero(adjacent[frontier].any(axis=0) & (label < 0))
            label[frontier] = group
        group += 1
    return label


def grouped_holdout(
    vectors: np.ndarray, skus: list[str], *, cosine: float = NEAR_DUPLICATE_COSINE, fraction: float = 0.2, seed: int = 0
) -> np.ndarray:
    """Rows to hold out: for each SKU, whole near-duplicate groups in a seeded random order until at least
    `fraction` of its photos are out. A group is skipped when it holds every photo of the SKU, or when it would
    take the held-out part past half once something is held out. A SKU with one photo is never held out.

    A burst of near-identical shots often links most of a SKU's photos into one group; holding that out leaves
    few photos to fit on, which is what brings the measurement nearer real queries (grocery, grocery-lite0-ms512: one
    draw 0.81-0.92 by seed, 0.84 on val; refusing such groups held out only 87 photos, at 0.98)."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(skus), dtype=bool)
    positions: dict[str, list[int]] = {}
    for i, s in enumerate(skus):
        positions.setdefault(s, []).append(i)
    for rows in positions.values():
        idx = np.asarray(rows[:MAX_GROUPED_PER_SKU])
        if len(idx) < 2:
            continue
        groups = near_duplicate_groups(vectors[idx], cosine)
        target, taken = math.ceil(len(rows) * fraction), 0
        for g in rng.permutation(int(groups.max()) + 1):
            members = idx[groups == g]
            if len(members) == len(rows) or (taken and taken + len(members) > len(rows) // 2):
                continue
            held[members] = True
            taken += len(members)
            if taken >= target:
                break
    return held


def single_photo_holdout(skus: list[str], fraction: float = 0.2) -> np.ndarray:
    """The last `fraction` of each SKU's rows (in order); a SKU with a single image is never held out."""
    held = np.zeros(len(skus), dtype=bool)
    positions: dict[str, list[int]] = {}
    for i, s in enumerate(skus):
        positions.setdefault(s, []).append(i)
    for idx in positions.values():
        n_out = min(len(idx) - 1, math.ceil(len(idx) * fraction))
        if n_out > 0:
            held[idx[-n_out:]] = True
    return held


def threshold_for_precision(scores: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """Lowest score threshold whose accepted answers (score >= t) have precision >= target, or None."""
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    precision = np.cumsum(c) / np.arange(1, len(c) + 1)
    ok = np.flatnonzero(precision >= target)
    if len(ok) == 0:
        return None
    last = ok[-1]
    # Ties: accepting index `last` accepts every equal score too; step back to a threshold that is valid.
    while last > 0 and last + 1 < len(s) and s[last + 1] == s[last] and precision[last + 1] < target:
        last -= 1
    return float(s[last])


@dataclass(frozen=True)
class Calibration:
    """Query photos with known SKU and category, embedded; searched against `catalogue_*` to calibrate."""

    vectors: np.ndarray
    labels: np.ndarray
    skus: np.ndarray
    seen: np.ndarray | None = None  # per photo: was it in the model's training set (None: unknown)


@dataclass(frozen=True)
class _Photos:
    vectors: np.ndarray
    labels: np.ndarray
    skus: np.ndarray

    def take(self, mask: np.ndarray) -> _Photos:
        return _Photos(self.vectors[mask], self.labels[mask], self.skus[mask])


@dataclass(frozen=True)
class _Round:
    """One measurement: query photos, the catalogue they are searched against, and the router fitted on it."""

    queries: _Photos
    catalogue: _Photos
    router: FittedRouter
    seen: np.ndarray | None


def train_router(
    vectors: np.ndarray,
    labels: np.ndarray,
    categories: list[str],
    skus: list[str],
    *,
    calibration: Calibration | None = None,
    seen: np.ndarray | None = None,
    model_card_unseen_top1: float | None = None,
    min_images: int = 5,
    max_probes: int = 8,
    max_loss: float = 0.005,
    target_precision: float = 0.9,
    min_threshold_samples: int = 20,
    max_measure_queries: int = 2000,
    near_duplicate_cosine: float = NEAR_DUPLICATE_COSINE,
    holdout_repeats: int = HOLDOUT_REPEATS,
    exhaustive_below: int = EXHAUSTIVE_BELOW_VECTORS,
    router_kind: RouterKind = "prototype",
    prototypes_per_category: int = PROTOTYPES_PER_CATEGORY,
) -> tuple[FittedRouter, RouterReport]:
    """Train the router and measure the probing policy and thresholds.

    With `calibration` (real query photos of catalogue SKUs): the router is trained on the whole catalogue and
    every figure is measured with those queries against it. Without: on held-out near-duplicate groups of the
    catalogue against the rest, `holdout_repeats` times with different groups held out, pooled. `seen` marks
    catalogue photos the model was trained on."""
    everything = _Photos(vectors, labels, np.asarray(skus))
    fit = partial(fit_router, router_kind, min_images=min_images, per_category=prototypes_per_category)
    router = fit(vectors, labels, categories)
    if calibration is not None:
        queries = _Photos(calibration.vectors, calibration.labels, calibration.skus)
        rounds, source, measurable = (
            [_Round(queries, everything, router, calibration.seen)],
            "calibration query photos",
            True,
        )
    else:
        rounds, source, measurable = _holdout_rounds(
            everything, categories, seen, fit=fit, cosine=near_duplicate_cosine, repeats=holdout_repeats
        )
    temperature = _pooled_temperature(rounds)
    router.temperature = temperature
    for r in rounds:
        r.router.temperature = temperature
    rounds = [_sample(r, max_measure_queries // len(rounds)) for r in rounds]
    report = _measure(rounds, categories, max_probes, target_precision, min_threshold_samples)
    _choose_policy(report, categories, len(vectors), max_loss, exhaustive_below, measurable)
    if router.kind == "linear":  # the prototype router has no fallback: a small category's images are its prototypes
        counts = np.bincount(labels, minlength=len(categories))
        report.fallback_categories = [categories[i] for i in np.flatnonzero(counts < min_images)]
    report.calibration_source, report.near_duplicate_cosine = source, near_duplicate_cosine
    seen_all = [r.seen for r in rounds if r.seen is not None and len(r.seen)]
    report.queries_seen_in_training = round(float(np.concatenate(seen_all).mean()), 4) if seen_all else None
    report.model_card_unseen_top1 = model_card_unseen_top1
    return router, report


def _holdout_rounds(
    everything: _Photos,
    categories: list[str],
    seen: np.ndarray | None,
    *,
    fit: Callable[[np.ndarray, np.ndarray, list[str]], FittedRouter],
    cosine: float,
    repeats: int,
) -> tuple[list[_Round], str, bool]:
    """Rounds of held-out near-duplicate groups against the rest, each with a router fitted on the rest; the
    source to report; and whether they may choose the probing policy."""
    skus = everything.skus.tolist()
    helds = [grouped_holdout(everything.vectors, skus, cosine=cosine, seed=r) for r in range(repeats)]
    source, measurable = f"held-out groups of catalogue photos, {repeats} draws", True
    if min(h.sum() for h in helds) < MIN_POLICY_QUERIES:
        # Too few groups to hold out (one burst per SKU): single photos still calibrate the open-set
        # thresholds, but they are near-copies of the rest, so the probing policy does not trust them.
        helds, measurable = [single_photo_holdout(skus)], False
        source = "held-out single catalogue photos (near-copies of the rest)"
    rounds = [
        _Round(
            everything.take(h),
            everything.take(~h),
            fit(everything.vectors[~h], everything.labels[~h], categories),
            seen[h] if seen is not None else None,
        )
        for h in helds
    ]
    return rounds, source, measurable


def _pooled_temperature(rounds: list[_Round]) -> float:
    logits = [r.router.logits(r.queries.vectors) for r in rounds if len(r.queries.labels)]
    if not logits:
        return 1.0
    return fit_temperature(np.vstack(logits), np.concatenate([r.queries.labels for r in rounds]))


def _sample(r: _Round, cap: int) -> _Round:
    """At most `cap` query photos (a seeded sample): each one is an exact search over the catalogue."""
    n = len(r.queries.labels)
    if n <= cap:
        return r
    pick = np.zeros(n, dtype=bool)
    pick[np.random.default_rng(0).choice(n, cap, replace=False)] = True
    return _Round(r.queries.take(pick), r.catalogue, r.router, r.seen[pick] if r.seen is not None else None)


def _choose_policy(
    report: RouterReport,
    categories: list[str],
    n_vectors: int,
    max_loss: float,
    exhaustive_below: int,
    measurable: bool,
) -> None:
    """The measured candidate, or every shard when the measurement cannot be trusted or searching all is cheap."""
    chosen = next(
        (c for c in report.candidates if c["loss1_points"] <= 100 * max_loss and c["loss5_points"] <= 100 * max_loss),
        None,
    )
    if n_vectors <= exhaustive_below and len(categories) <= EXHAUSTIVE_BELOW_SHARDS:
        reason = (
            f"every shard: the index holds {n_vectors} vectors (<= {exhaustive_below}) in {len(categories)} "
            f"shards (<= {EXHAUSTIVE_BELOW_SHARDS}), cheap to search whole"
        )
    elif report.calibration_queries < MIN_POLICY_QUERIES:
        reason = f"every shard: only {report.calibration_queries} photos to measure the router (< {MIN_POLICY_QUERIES})"
    elif not measurable:
        reason = "every shard: each SKU's photos are one group of near-copies, so none measures the router"
    elif chosen is None:
        reason = f"every shard: no probe_mass within {report.max_probes} probes lost <= {100 * max_loss:g} points"
    else:
        report.probe_mass = float(chosen["probe_mass"])
        report.routed_recall1 = round(float(chosen["recall1"]), 4)
        report.routing_loss_points = round(float(chosen["loss1_points"]), 3)
        report.routing_loss5_points = round(float(chosen["loss5_points"]), 3)
        report.mean_shards = round(float(chosen["shards"]), 3)
        report.policy_reason = f"the smallest probe_mass losing <= {100 * max_loss:g} points of recall@1 and @5"
        return
    report.probe_mass, report.max_probes = 1.0, len(categories)
    report.routed_recall1, report.routing_loss_points, report.routing_loss5_points = report.exhaustive_recall1, 0.0, 0.0
    report.mean_shards = float(len(categories))
    report.policy_reason = reason


def routed_top_skus(
    sims: np.ndarray,
    probs: np.ndarray,
    photos: _Photos,
    shard_skus: np.ndarray,
    mass: float,
    max_probes: int,
    k: int = FILL_K,
) -> tuple[list[str], int]:
    """What the service answers for `k`: the chosen shards, filled in probability order until they hold k SKUs
    (SearchEngine.fill_probes), searched exactly. Returns the SKUs and the shards the router chose."""
    chosen = [p.category for p in select_probes(probs, probe_mass=mass, max_probes=max_probes)]
    probed = np.zeros(len(probs), dtype=bool)
    probed[fill_shards(probs, chosen, shard_skus, k)] = True
    allowed = probed[photos.labels]  # a gather, not a set lookup: cheap on large catalogues
    return top_skus(np.where(allowed, sims, -np.inf), photos.skus, k), len(chosen)


def fill_shards(probs: np.ndarray, chosen: list[int], shard_skus: np.ndarray, k: int) -> list[int]:
    """The chosen shards, then the next in probability order until they hold k SKUs: the shards the service
    searches when nothing is filtered out (SearchEngine.fill_probes; tests/unit/test_router_training.py checks
    that the two agree)."""
    probed = list(chosen)
    held = int(shard_skus[chosen].sum())
    for idx in np.argsort(-probs, kind="stable"):
        if held >= k:
            break
        if int(idx) not in probed:
            probed.append(int(idx))
            held += int(shard_skus[idx])
    return probed


def _measure(
    rounds: list[_Round],
    categories: list[str],
    max_probes: int,
    target_precision: float,
    min_threshold_samples: int,
) -> RouterReport:
    """Router accuracy, routed against exhaustive recall at each probe_mass candidate, and the open-set samples,
    pooled over every round's query photos. Exact search, so that the measured loss is the router's alone; one
    query's similarities at a time, so memory stays O(catalogue), not O(queries x catalogue)."""
    tally = _Tally(len(PROBE_MASS_CANDIDATES))
    open_set = _OpenSetSamples()
    for r in rounds:
        _measure_round(r, categories, max_probes, tally, open_set)
    n, ex1, ex5, hits1, hits5, shards = tally.n, tally.ex1, tally.ex5, tally.hits1, tally.hits5, tally.shards
    top1, top3, masses = tally.top1, tally.top3, PROBE_MASS_CANDIDATES
    d = max(1, n)
    candidates = [
        {
            "probe_mass": mass,
            "recall1": hits1[m] / d,
            "recall5": hits5[m] / d,
            "loss1_points": 100 * (ex1 - hits1[m]) / d,
            "loss5_points": 100 * (ex5 - hits5[m]) / d,
            "shards": shards[m] / d,
        }
        for m, mass in enumerate(masses)
    ]
    last = candidates[-1]
    th = open_set.thresholds(categories, target_precision, min_threshold_samples)
    return RouterReport(
        kind=rounds[0].router.kind,
        temperature=round(rounds[0].router.temperature, 6),
        fallback_categories=[],
        calibration_queries=n,
        router_top1=round(top1 / d, 4),
        router_top3=round(top3 / d, 4),
        probe_mass=float(last["probe_mass"]),
        max_probes=max_probes,
        exhaustive_recall1=round(ex1 / d, 4),
        routed_recall1=round(float(last["recall1"]), 4),
        routing_loss_points=round(float(last["loss1_points"]), 3),
        mean_shards=round(float(last["shards"]), 3),
        candidates=[{k: round(float(v), 4) for k, v in c.items()} for c in candidates],
        target_precision=target_precision,
        global_threshold=round(th.global_threshold, 6),
        thresholds=th.by_category,
        threshold_samples=th.samples,
        threshold_fallback=th.fallback,
        min_threshold_samples=min_threshold_samples,
    )


class _Tally:
    """Counts over every measured query: router hits, exhaustive hits, and per probe_mass candidate the routed
    hits and shards chosen."""

    def __init__(self, candidates: int) -> None:
        self.n = self.top1 = self.top3 = self.ex1 = self.ex5 = 0
        self.hits1, self.hits5, self.shards = np.zeros(candidates), np.zeros(candidates), np.zeros(candidates)


def _measure_round(r: _Round, categories: list[str], max_probes: int, tally: _Tally, open_set: _OpenSetSamples) -> None:
    q, catalogue = r.queries, r.catalogue
    if not len(q.labels):
        return
    probs = r.router.predict_proba(q.vectors)
    ranked = np.argsort(-probs, axis=1)
    tally.n += len(q.labels)
    tally.top1 += int((ranked[:, 0] == q.labels).sum())
    tally.top3 += int((ranked[:, :3] == q.labels[:, None]).any(axis=1).sum())
    shard_skus = np.asarray([len(set(catalogue.skus[catalogue.labels == c].tolist())) for c in range(len(categories))])
    for i in range(len(q.labels)):
        sims = catalogue.vectors @ q.vectors[i]
        truth = q.skus[i]
        exhaustive = top_skus(sims, catalogue.skus, FILL_K)
        tally.ex1 += exhaustive[:1] == [truth]
        tally.ex5 += truth in exhaustive
        for m, mass in enumerate(PROBE_MASS_CANDIDATES):
            top1, n_probes = routed_top_skus(sims, probs[i], catalogue, shard_skus, mass, max_probes, k=1)
            top5, _ = routed_top_skus(sims, probs[i], catalogue, shard_skus, mass, max_probes, k=FILL_K)
            tally.hits1[m] += top1 == [truth]
            tally.hits5[m] += truth in top5
            tally.shards[m] += n_probes
        open_set.add(sims, truth, catalogue)


class _OpenSetSamples:
    """Top-1 scores of known queries (own SKU present) and simulated unknown ones (own SKU removed)."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.correct: list[bool] = []
        self.categories: list[int] = []

    def add(self, sims: np.ndarray, truth: str, catalogue: _Photos) -> None:
        own = catalogue.skus == truth
        best = int(sims.argmax())
        self._add(float(sims[best]), bool(catalogue.skus[best] == truth), int(catalogue.labels[best]))
        if (~own).any():
            other = int(np.where(own, -np.inf, sims).argmax())
            self._add(float(sims[other]), False, int(catalogue.labels[other]))

    def _add(self, score: float, correct: bool, category: int) -> None:
        self.scores.append(score)
        self.correct.append(correct)
        self.categories.append(category)

    def thresholds(self, categories: list[str], target_precision: float, min_samples: int) -> _Thresholds:
        """Per category (of the top hit) its own threshold when it has `min_samples` samples and reaches the
        precision; else the global one. Which categories fell back is recorded: a demo-sized calibration leaves
        every category below the sample floor, and equal thresholds must not look like a measured coincidence."""
        s, c, cat = np.asarray(self.scores), np.asarray(self.correct, dtype=bool), np.asarray(self.categories)
        global_t = threshold_for_precision(s, c, target_precision) if len(s) else None
        out = _Thresholds(global_t if global_t is not None else -1.0)
        for ci, name in enumerate(categories):
            mask = cat == ci
            n = int(mask.sum())
            t = threshold_for_precision(s[mask], c[mask], target_precision) if n >= min_samples else None
            out.by_category[name] = round(t if t is not None else out.global_threshold, 6)
            out.samples[name] = n
            if t is None:
                out.fallback.append(name)
        return out


@dataclass
class _Thresholds:
    global_threshold: float
    by_category: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # open-set samples whose top hit is in the category
    fallback: list[str] = field(default_factory=list)  # categories on the global threshold
