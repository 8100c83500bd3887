"""Category router: which shards to search for a query.

`LinearRouter`, stored in `router.npz` (no pickle): a softmax classifier over embeddings, trained with
class-balanced cross-entropy and temperature-scaled (app/pipeline/router_training.py). Categories with too few
images to learn from keep nearest-centroid weights (their centroid times a shared learnt scale, plus a shared
bias), so they stay in the same calibrated softmax. (The first version was nearest-centroid alone; on grocery val
with the frozen model it gave router top-1 0.753, the linear router 0.858.)
Shards are probed in descending probability until the cumulative mass reaches `probe_mass` or `max_probes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from app.errors import ArtifactError

LINEAR_FORMAT = "linear-v1"


class Router(Protocol):
    """Port: a unit query vector in, one probability per category out (same order as `categories`)."""

    @property
    def categories(self) -> list[str]: ...

    @property
    def dim(self) -> int: ...

    def probabilities(self, query: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Probe:
    category: int
    probability: float


def select_probes(probs: np.ndarray, *, probe_mass: float, max_probes: int) -> list[Probe]:
    """Take categories in descending probability until their cumulative probability reaches `probe_mass`,
    or `max_probes` are taken. Always at least one. Ties keep the lower category index first.

    `probe_mass >= 1` means "every shard, up to max_probes": an overconfident router gives its top category a
    probability that rounds to 1.0 in float32, and a mass rule would stop there (seen: k=100, probe_mass=1,
    max_probes=100 searched one shard of 43)."""
    order = np.argsort(-probs, kind="stable")
    probes: list[Probe] = []
    mass = 0.0
    everything = probe_mass >= 1.0
    for idx in order[: max(1, max_probes)]:
        probes.append(Probe(int(idx), float(probs[idx])))
        mass += float(probs[idx])
        if not everything and mass >= probe_mass - 1e-9:
            break
    return probes


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


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
    for t in np.geomspace(0.05, 20.0, 80):
        p = softmax(logits / t)[np.arange(len(labels)), labels]
        nll = float(-np.log(np.maximum(p, 1e-12)).mean())
        if nll < best_nll:
            best_t, best_nll = float(t), nll
    return best_t


class LinearRouter:
    def __init__(self, categories: list[str], weights: np.ndarray, bias: np.ndarray, temperature: float) -> None:
        if weights.shape[0] != len(categories) or bias.shape != (len(categories),):
            raise ValueError("weights, bias and categories disagree")
        if temperature <= 0 or not np.isfinite(temperature):
            raise ValueError("temperature must be a positive number")
        self._categories = list(categories)
        self._w = np.ascontiguousarray(weights, dtype=np.float32)
        self._b = bias.astype(np.float32)
        self.temperature = float(temperature)

    @property
    def categories(self) -> list[str]:
        return self._categories

    @property
    def dim(self) -> int:
        return int(self._w.shape[1])

    def logits(self, queries: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.atleast_2d(queries).astype(np.float32) @ self._w.T + self._b
        return out

    def probabilities(self, query: np.ndarray) -> np.ndarray:
        out: np.ndarray = softmax(self.logits(query)[0] / self.temperature)
        return out

    def predict_proba(self, queries: np.ndarray) -> np.ndarray:
        out: np.ndarray = softmax(self.logits(queries) / self.temperature)
        return out

    @classmethod
    def fit(
        cls,
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
        are not given free weights: they use centroid * scale + shared bias (nearest-centroid fallback).
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
        return cls(categories, w.astype(np.float32), b.astype(np.float32), 1.0)

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(
                fh,
                format=np.asarray(LINEAR_FORMAT),
                categories=np.asarray(self._categories, dtype=str),
                weights=self._w,
                bias=self._b,
                temperature=np.asarray(self.temperature, dtype=np.float64),
            )


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


def load_router(path: Path) -> LinearRouter:
    """Load router.npz (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            fmt = str(data["format"])
            categories = [str(c) for c in data["categories"]]
            temperature = float(data["temperature"])
            if fmt == LINEAR_FORMAT:
                return LinearRouter(categories, data["weights"], data["bias"], temperature)
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(f"router {path}: cannot read it ({type(exc).__name__})") from exc
    raise ArtifactError(f"router {path}: unknown format {fmt!r}")
