"""Retrieval metrics shared by training, model comparison and tests (no torch)."""

from __future__ import annotations

import numpy as np


def sku_recall(
    queries: np.ndarray, query_skus: list[str], catalogue: np.ndarray, catalogue_skus: list[str], ks: tuple[int, ...]
) -> dict[int, float]:
    """Fraction of queries whose SKU is among the top-k distinct SKUs of an exact cosine search (each SKU ranked
    by its best image). Ties keep catalogue order."""
    if len(query_skus) == 0:
        return dict.fromkeys(ks, 0.0)
    sims = queries @ catalogue.T
    order = np.argsort(-sims, axis=1, kind="stable")
    hits = dict.fromkeys(ks, 0)
    for qi, row in enumerate(order):
        ranked: list[str] = []
        for j in row:
            sku = catalogue_skus[j]
            if sku not in ranked:
                ranked.append(sku)
                if len(ranked) == max(ks):
                    break
        for k in ks:
            hits[k] += query_skus[qi] in ranked[:k]
    return {k: hits[k] / len(query_skus) for k in ks}
