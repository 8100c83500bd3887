"""Fitting the category router (offline: the index build and the scripts call it; the service never does)."""

from __future__ import annotations

from typing import Literal

import faiss
import numpy as np

from app.engine.routing import FittedRouter, LinearRouter, PrototypeRouter, softmax

RouterKind = Literal["prototype", "linear"]
# Prototypes per category. Grocery, grocery-lite0-ms512, val photos (scripts/compare_routers.py): 8 -> top-1
# 0.851, 12 and 16 -> 0.865, 24 -> 0.865, 32 -> 0.861; the build's held-out-group measurement was within 1 point of
# val from 8 to 32 and 5 points above it at ~n/4 (up to 64), where prototypes become near-copies of single bursts.
PROTOTYPES_PER_CATEGORY = 16
# Prototypes in all: routing costs one product with each (one thread here: 688 prototypes 0.17 ms a query, 16,000
# 1.6 ms; the linear router 0.05-0.07 ms), so many categories get fewer each (4 a category at 1,000 categories).
PROTOTYPE_BUDGET = 4096


def class_centroids(vectors: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    cents = np.zeros((n_classes, vectors.shape[1]), dtype=np.float32)
    for c in range(n_classes):
        members = vectors[labels == c]
        if len(members):
            cents[c] = members.mean(axis=0)
    out: np.ndarray = cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature minimising the negative log-likelihood of held-out labels (Guo et al. 2017)."""
    best_t, best_nll = 1.0, np.inf
    # From 0.002: cosine logits (the prototype router) span [-1, 1] and fit near 0.05.
    for t in np.geomspace(0.002, 20.0, 120):
        p = softmax(logits / t)[np.arange(len(labels)), labels]
        nll = float(-np.log(np.maximum(p, 1e-12)).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


def fit_linear_router(
    vectors: np.ndarray,
    labels: np.ndarray,
    categories: list[str],
    *,
    min_images: int = 5,
    l2: float = 1e-4,
    steps: int = 400,
    lr: float = 0.05,
    seed: int = 0,
    max_per_category: int = 500,
) -> LinearRouter:
    """Class-balanced softmax regression (full-batch Adam). Categories with fewer than `min_images` images
    are not given free weights: they use centroid * scale + shared bias (nearest-centroid fallback); that shared
    scale and bias over fixed centroids is why this is written here and not scikit-learn's LogisticRegression.
    At most `max_per_category` images of a category (a seeded sample) enter the fit: a linear model over tens
    of categories needs no more, and the cost of a large catalogue's build stays bounded (200k images:
    minutes -> seconds)."""
    rng = np.random.default_rng(seed)
    keep = sample_per_class(labels, max_per_category, rng)
    x = np.asarray(vectors[keep], dtype=np.float32)  # float32: half the time of float64, same optimum
    labels = labels[keep]
    n, d = x.shape
    c = len(categories)
    counts = np.bincount(labels, minlength=c)
    if (counts == 0).any():
        raise ValueError(f"categories without images: {[categories[i] for i in np.flatnonzero(counts == 0)]}")
    fallback = counts < min_images
    cents = class_centroids(x, labels, c).astype(np.float64)
    sample_w = (1.0 / counts[labels]) / c  # class-balanced: every category weighs the same in total
    onehot = np.zeros((n, c))
    onehot[np.arange(n), labels] = 1.0

    params = {
        "w": cents * 10.0 + rng.normal(scale=1e-3, size=(c, d)),  # start at nearest-centroid
        "b": np.zeros(c),
        "s": np.array([10.0]),  # fallback scale
        "b0": np.array([0.0]),  # fallback bias
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    for t in range(1, steps + 1):
        w = np.where(fallback[:, None], params["s"] * cents, params["w"])
        b = np.where(fallback, params["b0"], params["b"])
        g = (softmax(x @ w.T.astype(np.float32) + b) - onehot) * sample_w[:, None]  # dLoss/dlogits
        gw, gb = (g.T.astype(np.float32) @ x).astype(np.float64), g.sum(axis=0)
        grads = {
            "w": np.where(fallback[:, None], 0.0, gw + l2 * params["w"]),
            "b": np.where(fallback, 0.0, gb),
            "s": np.array([float((gw[fallback] * cents[fallback]).sum())]),
            "b0": np.array([float(gb[fallback].sum())]),
        }
        for k in params:
            m[k] = 0.9 * m[k] + 0.1 * grads[k]
            v2[k] = 0.999 * v2[k] + 0.001 * grads[k] ** 2
            params[k] -= lr * (m[k] / (1 - 0.9**t)) / (np.sqrt(v2[k] / (1 - 0.999**t)) + 1e-8)
    w = np.where(fallback[:, None], params["s"] * cents, params["w"])
    b = np.where(fallback, params["b0"], params["b"])
    return LinearRouter(categories, w.astype(np.float32), b.astype(np.float32), 1.0)


def sample_per_class(labels: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Indices keeping every image of small classes and a sample of `cap` of larger ones, in original order."""
    counts = np.bincount(labels)
    if counts.max(initial=0) <= cap:
        return np.arange(len(labels))
    keep = [
        idx if len(idx) <= cap else rng.choice(idx, cap, replace=False)
        for idx in (np.flatnonzero(labels == c) for c in range(len(counts)))
    ]
    return np.sort(np.concatenate(keep))


def fit_router(
    kind: RouterKind,
    vectors: np.ndarray,
    labels: np.ndarray,
    categories: list[str],
    *,
    min_images: int = 5,
    per_category: int = PROTOTYPES_PER_CATEGORY,
) -> FittedRouter:
    if kind == "linear":
        return fit_linear_router(vectors, labels, categories, min_images=min_images)
    return fit_prototype_router(vectors, labels, categories, per_category=per_category)


def fit_prototype_router(
    vectors: np.ndarray,
    labels: np.ndarray,
    categories: list[str],
    *,
    per_category: int = PROTOTYPES_PER_CATEGORY,
    seed: int = 0,
    max_per_category: int = 5000,
) -> PrototypeRouter:
    """Spherical k-means prototypes per category (faiss.Kmeans), at most `PROTOTYPE_BUDGET` in all; a category
    with no more images than its share keeps each image as a prototype. At most `max_per_category` images of a
    category (a seeded sample) enter its k-means, which bounds a large catalogue's build."""
    rng = np.random.default_rng(seed)
    keep = sample_per_class(labels, max_per_category, rng)
    x, labels = np.asarray(vectors[keep], dtype=np.float32), labels[keep]
    per_category = max(1, min(per_category, PROTOTYPE_BUDGET // max(1, len(categories))))
    blocks: list[np.ndarray] = []
    for c in range(len(categories)):
        members = np.ascontiguousarray(x[labels == c])
        if not len(members):
            raise ValueError(f"category without images: {categories[c]}")
        blocks.append(_prototypes(members, per_category, seed))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blocks])])
    return PrototypeRouter(categories, np.vstack(blocks), offsets, 1.0)


def _prototypes(members: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(members) <= n:
        centroids = members
    else:
        km = faiss.Kmeans(members.shape[1], n, niter=20, seed=seed, spherical=True, min_points_per_centroid=1)
        km.train(members)
        centroids = np.asarray(km.centroids)
    out: np.ndarray = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)
