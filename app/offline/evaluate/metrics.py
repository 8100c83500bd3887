"""Retrieval metrics shared by training, model comparison and tests (no torch)."""

from __future__ import annotations

import numpy as np


def top_skus(scores: np.ndarray, skus: np.ndarray | list[str], k: int) -> list[str]:
    """The first k distinct SKUs by descending score (each SKU ranked by its best image); -inf scores are
    excluded (masked out). Ties keep catalogue order."""
    order = _ranked(scores, max(64, 16 * k))
    ranked = _distinct(order, scores, skus, k)
    if len(ranked) < k and len(order) < len(scores):
        ranked = _distinct(np.argsort(-scores, kind="stable"), scores, skus, k)  # rare: many images per SKU
    return ranked


def _ranked(scores: np.ndarray, m: int) -> np.ndarray:
    """Indices of the best m scores (all ties at the m-th score included), best first, ties in index order:
    the head of a stable full sort, at O(n) instead of O(n log n) for large catalogues."""
    if len(scores) <= m:
        return np.argsort(-scores, kind="stable")
    kth = np.partition(scores, len(scores) - m)[len(scores) - m]
    head = np.flatnonzero(scores >= kth)
    return head[np.argsort(-scores[head], kind="stable")]


def _distinct(order: np.ndarray, scores: np.ndarray, skus: np.ndarray | list[str], k: int) -> list[str]:
    ranked: list[str] = []
    for j in order:
        if np.isneginf(scores[j]):
            break
        if skus[j] not in ranked:
            ranked.append(str(skus[j]))
            if len(ranked) == k:
                break
    return ranked


def sku_recall(
    queries: np.ndarray, query_skus: list[str], catalogue: np.ndarray, catalogue_skus: list[str], ks: tuple[int, ...]
) -> dict[int, float]:
    """Fraction of queries whose SKU is among the top-k distinct SKUs of an exact cosine search (each SKU ranked
    by its best image). Ties keep catalogue order."""
    if len(query_skus) == 0:
        return dict.fromkeys(ks, 0.0)
    sims = queries @ catalogue.T
    hits = dict.fromkeys(ks, 0)
    for qi in range(len(query_skus)):
        ranked = top_skus(sims[qi], catalogue_skus, max(ks))
        for k in ks:
            hits[k] += query_skus[qi] in ranked[:k]
    return {k: hits[k] / len(query_skus) for k in ks}


def recall_at_k(ranked: list[list[str]], truth: list[str], k: int) -> float:
    """Fraction of queries whose true SKU is in the first k of its ranked SKU list."""
    return sum(t in r[:k] for r, t in zip(ranked, truth, strict=True)) / len(truth) if truth else 0.0


def precision_at_k(ranked: list[list[str]], truth: list[str], k: int) -> float:
    """Mean fraction of the first k slots holding the true SKU. Results are one row per SKU, so at most one
    slot can: precision@k = hits / k, and an answer shorter than k still counts k slots."""
    return sum((t in r[:k]) / k for r, t in zip(ranked, truth, strict=True)) / len(truth) if truth else 0.0


def map_at_k(ranked: list[list[str]], truth: list[str], k: int) -> float:
    """Mean average precision at k with one relevant SKU per query: 1/rank when within k, else 0."""
    total = 0.0
    for r, t in zip(ranked, truth, strict=True):
        if t in r[:k]:
            total += 1.0 / (r.index(t) + 1)
    return total / len(truth) if truth else 0.0


def confusion_matrix(y_true: list[int], y_pred: list[int], n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        m[t, p] += 1
    return m


def classification_report(matrix: np.ndarray, names: list[str]) -> dict[str, dict[str, float]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows: truth), plus micro, macro and
    weighted averages. A class never predicted has precision 0; a class with no support has recall 0 and is left
    out of the macro average (it has nothing to recall)."""
    tp = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    out: dict[str, dict[str, float]] = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    total = support.sum()
    present = support > 0
    micro = float(tp.sum() / total) if total else 0.0
    out["micro avg"] = {"precision": micro, "recall": micro, "f1": micro, "support": int(total)}
    out["macro avg"] = {
        key: float(vals[present].mean()) if present.any() else 0.0
        for key, vals in (("precision", precision), ("recall", recall), ("f1", f1))
    } | {"support": int(total)}
    w = support / total if total else support
    out["weighted avg"] = {
        "precision": float((precision * w).sum()),
        "recall": float((recall * w).sum()),
        "f1": float((f1 * w).sum()),
        "support": int(total),
    }
    return out


def ann_recall(approx_rows: np.ndarray, exact_scores: np.ndarray, k: int, tol: float = 1e-5) -> float:
    """ANN recall@k of one query, by score: the share of the k nearest rows (exact scores of every row) that the
    approximate top-k matches, a row counting when its exact score reaches the exact k-th best (within `tol`).
    By score, not by id: two rows with the same score (duplicate photos) or a float-rounding swap at the k-th
    place are equally near, and an id comparison would count them as misses."""
    want = min(k, len(exact_scores))
    if want == 0:
        return 1.0
    kth = np.partition(exact_scores, len(exact_scores) - want)[len(exact_scores) - want]
    rows = np.unique(np.asarray(approx_rows[:k], dtype=np.int64))
    return min(int((exact_scores[rows] >= kth - tol).sum()), want) / want


def pr_curve(scores: np.ndarray, correct: np.ndarray) -> dict[str, list[float]]:
    """Precision and recall of 'answer only when the top score >= t', for every distinct t (descending)."""
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order].astype(np.float64)
    tp = np.cumsum(c)
    accepted = np.arange(1, len(c) + 1)
    last_of_tie = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, dtype=bool)
    total_correct = max(1.0, float(c.sum()))
    return {
        "threshold": s[last_of_tie].tolist(),
        "precision": (tp / accepted)[last_of_tie].tolist(),
        "recall": (tp / total_correct)[last_of_tie].tolist(),
    }
