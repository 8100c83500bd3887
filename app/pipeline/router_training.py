"""Train and calibrate the category router at build time, and choose the probing policy and open-set thresholds
from measurements on a held-out part of the catalogue.

Held-out part: the last 20 % of each SKU's photos in catalogue order. Catalogues are often burst shots, and a
random split would put near-duplicates on both sides and make every figure look better than it is.

- Temperature: fitted on the held-out photos with the router trained on the rest (then the router is refitted on
  everything and keeps that temperature).
- probe_mass: the smallest candidate whose routed recall@1 loses <= `max_loss` against exhaustive search, both by
  exact search over the fitting part; recorded with the loss and mean shards probed.
- Open set: unknown products are simulated by searching each held-out photo with its own SKU removed. Per
  category (of the top hit), the lowest top-1 score threshold whose accepted answers reach `target_precision`;
  categories with too few samples use the global threshold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.router import LinearRouter, fit_temperature, select_probes

PROBE_MASS_CANDIDATES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclass
class RouterReport:
    kind: str
    temperature: float
    fallback_categories: list[str]
    holdout_images: int
    holdout_top1: float
    holdout_top3: float
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


def train_router(
    vectors: np.ndarray,
    labels: np.ndarray,
    categories: list[str],
    skus: list[str],
    *,
    min_images: int = 5,
    max_probes: int = 8,
    max_loss: float = 0.005,
    target_precision: float = 0.9,
    min_threshold_samples: int = 20,
) -> tuple[LinearRouter, RouterReport]:
    held = holdout_mask(skus)
    fit_idx, held_idx = np.flatnonzero(~held), np.flatnonzero(held)
    sku_arr = np.asarray(skus)
    draft = LinearRouter.fit(vectors[fit_idx], labels[fit_idx], categories, min_images=min_images)
    temperature = fit_temperature(draft.logits(vectors[held_idx]), labels[held_idx]) if len(held_idx) else 1.0
    draft.temperature = temperature
    probs = draft.predict_proba(vectors[held_idx])
    truth = labels[held_idx]
    ranked = np.argsort(-probs, axis=1)
    top1 = float((ranked[:, 0] == truth).mean()) if len(truth) else 0.0
    top3 = float((ranked[:, :3] == truth[:, None]).any(axis=1).mean()) if len(truth) else 0.0

    # Exact search of held-out photos over the fitting part.
    sims = vectors[held_idx] @ vectors[fit_idx].T
    fit_labels, fit_skus = labels[fit_idx], sku_arr[fit_idx]
    exhaustive_hit = fit_skus[sims.argmax(axis=1)] == sku_arr[held_idx] if len(held_idx) else np.zeros(0, bool)
    exhaustive = float(exhaustive_hit.mean()) if len(held_idx) else 0.0
    candidates = []
    chosen = None
    for mass in PROBE_MASS_CANDIDATES:
        hits, shards = 0, 0
        for qi in range(len(held_idx)):
            probes = select_probes(probs[qi], probe_mass=mass, max_probes=max_probes)
            allowed = np.isin(fit_labels, [p.category for p in probes])
            hits += fit_skus[np.where(allowed, sims[qi], -np.inf).argmax()] == sku_arr[held_idx[qi]]
            shards += len(probes)
        n = max(1, len(held_idx))
        row = {
            "probe_mass": mass,
            "recall1": hits / n,
            "loss_points": 100 * (exhaustive - hits / n),
            "shards": shards / n,
        }
        candidates.append(row)
        if chosen is None and exhaustive - hits / n <= max_loss:
            chosen = row
    chosen = chosen or candidates[-1]

    # Open set: known (own SKU present) and simulated unknown (own SKU removed) queries.
    scores, correct, cats = [], [], []
    for qi in range(len(held_idx)):
        own = fit_skus == sku_arr[held_idx[qi]]
        best = int(sims[qi].argmax())
        scores.append(sims[qi, best])
        correct.append(fit_skus[best] == sku_arr[held_idx[qi]])
        cats.append(fit_labels[best])
        if (~own).any():
            other = int(np.where(own, -np.inf, sims[qi]).argmax())
            scores.append(sims[qi, other])
            correct.append(False)
            cats.append(fit_labels[other])
    s_arr, c_arr, cat_arr = np.asarray(scores), np.asarray(correct), np.asarray(cats)
    global_t = threshold_for_precision(s_arr, c_arr, target_precision) if len(s_arr) else None
    global_threshold = global_t if global_t is not None else -1.0
    thresholds: dict[str, float] = {}
    for ci, name in enumerate(categories):
        mask = cat_arr == ci
        t = None
        if mask.sum() >= min_threshold_samples:
            t = threshold_for_precision(s_arr[mask], c_arr[mask], target_precision)
        thresholds[name] = round(t if t is not None else global_threshold, 6)

    router = LinearRouter.fit(vectors, labels, categories, min_images=min_images)
    router.temperature = temperature
    counts = np.bincount(labels, minlength=len(categories))
    report = RouterReport(
        kind="linear",
        temperature=round(temperature, 6),
        fallback_categories=[categories[i] for i in np.flatnonzero(counts < min_images)],
        holdout_images=len(held_idx),
        holdout_top1=round(top1, 4),
        holdout_top3=round(top3, 4),
        probe_mass=float(chosen["probe_mass"]),
        max_probes=max_probes,
        exhaustive_recall1=round(exhaustive, 4),
        routed_recall1=round(float(chosen["recall1"]), 4),
        routing_loss_points=round(float(chosen["loss_points"]), 3),
        mean_shards=round(float(chosen["shards"]), 3),
        candidates=[{k: round(float(v), 4) for k, v in c.items()} for c in candidates],
        target_precision=target_precision,
        global_threshold=round(global_threshold, 6),
        thresholds=thresholds,
    )
    return router, report
