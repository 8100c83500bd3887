"""Train and calibrate the category router at build time, and choose the probing policy and open-set thresholds
from measurements on a held-out part of the catalogue.

Held-out part: the last 20 % of each SKU's photos in catalogue order. Catalogues are often burst shots, and a
random split would put near-duplicates on both sides and make every figure look better than it is.

- Temperature: fitted on the held-out photos with the router trained on the rest (then the router is refitted on
  everything and keeps that temperature).
- probe_mass: the smallest candidate whose routed recall@1 and recall@5 each lose <= `max_loss` against exhaustive
  search, both by exact search; recorded with the losses and mean shards probed.

Held-out burst shots are near-duplicates of the fitting part, so the router looks surer there than on real
queries (grocery, trained model: top-1 0.99 held out, 0.85 on val photos, and probe_mass 0.6 then cost 7 points
of recall@5). `vps build-index --calibration-queries CSV` measures all of this on real query photos instead.
- Open set: unknown products are simulated by searching each held-out photo with its own SKU removed. Per
  category (of the top hit), the lowest top-1 score threshold whose accepted answers reach `target_precision`;
  categories with too few samples use the global threshold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.pipeline.evaluation import top_skus
from app.router import LinearRouter, fit_temperature, select_probes

PROBE_MASS_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


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
    calibration_source: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def holdout_mask(skus: list[str], fraction: float = 0.2) -> np.ndarray:
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


def train_router(
    vectors: np.ndarray,
    labels: np.ndarray,
    categories: list[str],
    skus: list[str],
    *,
    calibration: Calibration | None = None,
    min_images: int = 5,
    max_probes: int = 8,
    max_loss: float = 0.005,
    target_precision: float = 0.9,
    min_threshold_samples: int = 20,
    max_measure_queries: int = 2000,
) -> tuple[LinearRouter, RouterReport]:
    """Train the router and measure the probing policy and thresholds.

    With `calibration` (real query photos of catalogue SKUs): the router is trained on the whole catalogue and
    every figure is measured with those queries against it. Without: on the held-out part of the catalogue
    against the rest, which for burst-shot catalogues overstates the router's confidence (see module doc)."""
    sku_arr = np.asarray(skus)
    if calibration is not None:
        router = LinearRouter.fit(vectors, labels, categories, min_images=min_images)
        q_vec, q_lab, q_sku = calibration.vectors, calibration.labels, calibration.skus
        c_vec, c_lab, c_sku = vectors, labels, sku_arr
        draft = router
        source = "calibration queries"
    else:
        held = holdout_mask(skus)
        draft = LinearRouter.fit(vectors[~held], labels[~held], categories, min_images=min_images)
        q_vec, q_lab, q_sku = vectors[held], labels[held], sku_arr[held]
        c_vec, c_lab, c_sku = vectors[~held], labels[~held], sku_arr[~held]
        router = LinearRouter.fit(vectors, labels, categories, min_images=min_images)
        source = "held-out catalogue photos"
    temperature = fit_temperature(draft.logits(q_vec), q_lab) if len(q_lab) else 1.0
    draft.temperature = temperature
    router.temperature = temperature
    if len(q_lab) > max_measure_queries:
        # Each measured query is an exact search over the catalogue: a seeded sample keeps large builds bounded.
        pick = np.sort(np.random.default_rng(0).choice(len(q_lab), max_measure_queries, replace=False))
        q_vec, q_lab, q_sku = q_vec[pick], q_lab[pick], q_sku[pick]
    report = _measure(
        draft,
        q_vec,
        q_lab,
        q_sku,
        c_vec,
        c_lab,
        c_sku,
        categories,
        max_probes,
        max_loss,
        target_precision,
        min_threshold_samples,
    )
    counts = np.bincount(labels, minlength=len(categories))
    report.fallback_categories = [categories[i] for i in np.flatnonzero(counts < min_images)]
    report.calibration_source = source
    return router, report


def _measure(
    router: LinearRouter,
    q_vec: np.ndarray,
    q_lab: np.ndarray,
    q_sku: np.ndarray,
    c_vec: np.ndarray,
    c_lab: np.ndarray,
    c_sku: np.ndarray,
    categories: list[str],
    max_probes: int,
    max_loss: float,
    target_precision: float,
    min_threshold_samples: int,
) -> RouterReport:
    n = len(q_lab)
    probs = router.predict_proba(q_vec) if n else np.zeros((0, len(categories)))
    ranked = np.argsort(-probs, axis=1)
    top1 = float((ranked[:, 0] == q_lab).mean()) if n else 0.0
    top3 = float((ranked[:, :3] == q_lab[:, None]).any(axis=1).mean()) if n else 0.0

    # Exact search, so that the measured loss is the router's alone. One query's similarities at a time: memory
    # stays O(catalogue), not O(queries x catalogue).
    masses = PROBE_MASS_CANDIDATES
    hits1, hits5, shards = np.zeros(len(masses)), np.zeros(len(masses)), np.zeros(len(masses))
    ex_hits1 = ex_hits5 = 0
    scores, correct, cats = [], [], []  # open set: known and simulated-unknown queries
    for i in range(n):
        sims = c_vec @ q_vec[i]
        exhaustive = top_skus(sims, c_sku, 5)
        ex_hits1 += exhaustive[:1] == [q_sku[i]]
        ex_hits5 += q_sku[i] in exhaustive
        for m, mass in enumerate(masses):
            probes = select_probes(probs[i], probe_mass=mass, max_probes=max_probes)
            probed = np.zeros(len(categories), dtype=bool)
            probed[[p.category for p in probes]] = True
            allowed = probed[c_lab]  # a gather, not a set lookup: cheap on large catalogues
            got = top_skus(np.where(allowed, sims, -np.inf), c_sku, 5)
            hits1[m] += got[:1] == [q_sku[i]]
            hits5[m] += q_sku[i] in got
            shards[m] += len(probes)
        own = c_sku == q_sku[i]
        best = int(sims.argmax())
        scores.append(sims[best])
        correct.append(c_sku[best] == q_sku[i])
        cats.append(c_lab[best])
        if (~own).any():
            other = int(np.where(own, -np.inf, sims).argmax())
            scores.append(sims[other])
            correct.append(False)
            cats.append(c_lab[other])
    d = max(1, n)
    ex1, ex5 = ex_hits1 / d, ex_hits5 / d
    candidates: list[dict[str, float]] = []
    chosen: dict[str, float] | None = None
    for m, mass in enumerate(masses):
        row = {
            "probe_mass": mass,
            "recall1": hits1[m] / d,
            "recall5": hits5[m] / d,
            "loss1_points": 100 * (ex1 - hits1[m] / d),
            "loss5_points": 100 * (ex5 - hits5[m] / d),
            "shards": shards[m] / d,
        }
        candidates.append(row)
        if chosen is None and ex1 - hits1[m] / d <= max_loss and ex5 - hits5[m] / d <= max_loss:
            chosen = row
    if chosen is None:
        chosen = candidates[-1]

    s_arr, c_arr, cat_arr = np.asarray(scores), np.asarray(correct, dtype=bool), np.asarray(cats)
    global_t = threshold_for_precision(s_arr, c_arr, target_precision) if len(s_arr) else None
    global_threshold = global_t if global_t is not None else -1.0
    thresholds: dict[str, float] = {}
    for ci, name in enumerate(categories):
        mask = cat_arr == ci
        t = None
        if mask.sum() >= min_threshold_samples:
            t = threshold_for_precision(s_arr[mask], c_arr[mask], target_precision)
        thresholds[name] = round(t if t is not None else global_threshold, 6)
    return RouterReport(
        kind="linear",
        temperature=round(router.temperature, 6),
        fallback_categories=[],
        calibration_queries=n,
        router_top1=round(top1, 4),
        router_top3=round(top3, 4),
        probe_mass=float(chosen["probe_mass"]),
        max_probes=max_probes,
        exhaustive_recall1=round(float(ex1), 4),
        routed_recall1=round(float(chosen["recall1"]), 4),
        routing_loss_points=round(float(chosen["loss1_points"]), 3),
        mean_shards=round(float(chosen["shards"]), 3),
        candidates=[{k: round(float(v), 4) for k, v in c.items()} for c in candidates],
        target_precision=target_precision,
        global_threshold=round(global_threshold, 6),
        thresholds=thresholds,
    )
