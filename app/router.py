"""Category router: which shards to search for a query.

First version: nearest centroid. Each category has one or more unit centroids (k-means sub-centroids for large
categories, since one mean blurs a varied category); a category's score is its best centroid's cosine, and a
softmax with a temperature turns scores into probabilities. Shards are probed in descending probability until
the cumulative mass reaches `probe_mass` or `max_probes` shards are taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from app.errors import ArtifactError

ROUTER_FORMAT = "centroid-v1"


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
    or `max_probes` are taken. Always at least one. Ties keep the lower category index first."""
    order = np.argsort(-probs, kind="stable")
    probes: list[Probe] = []
    mass = 0.0
    for idx in order[: max(1, max_probes)]:
        probes.append(Probe(int(idx), float(probs[idx])))
        mass += float(probs[idx])
        if mass >= probe_mass - 1e-9:
            break
    return probes


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=-1, keepdims=True)
    return out


class CentroidRouter:
    def __init__(self, categories: list[str], centroids: np.ndarray, owner: np.ndarray, temperature: float) -> None:
        if centroids.ndim != 2 or len(owner) != len(centroids):
            raise ValueError("centroids and owner disagree")
        if temperature <= 0 or not np.isfinite(temperature):
            raise ValueError("temperature must be a positive number")
        self._categories = list(categories)
        self._centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self._owner = owner.astype(np.int64)
        self.temperature = float(temperature)

    @property
    def categories(self) -> list[str]:
        return self._categories

    @property
    def dim(self) -> int:
        return int(self._centroids.shape[1])

    def category_scores(self, queries: np.ndarray) -> np.ndarray:
        """(nq, n_categories): each category's best centroid cosine."""
        sims = np.atleast_2d(queries).astype(np.float32) @ self._centroids.T
        scores = np.full((sims.shape[0], len(self._categories)), -np.inf, dtype=np.float32)
        np.maximum.at(scores.T, self._owner, sims.T)
        return scores

    def probabilities(self, query: np.ndarray) -> np.ndarray:
        out: np.ndarray = softmax(self.category_scores(query)[0] / self.temperature)
        return out

    # --- fitting and storage -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        categories: list[str],
        *,
        max_subcentroids: int = 4,
        min_points_per_centroid: int = 20,
        temperature: float = 0.05,
        seed: int = 0,
    ) -> CentroidRouter:
        centroids: list[np.ndarray] = []
        owner: list[int] = []
        for c in range(len(categories)):
            members = np.ascontiguousarray(vectors[labels == c], dtype=np.float32)
            if len(members) == 0:
                raise ValueError(f"category {categories[c]!r} has no vectors")
            n_sub = min(max_subcentroids, len(members) // min_points_per_centroid)
            if n_sub >= 2:
                km = faiss.Kmeans(
                    members.shape[1],
                    n_sub,
                    niter=20,
                    seed=seed,
                    spherical=True,
                    verbose=False,
                    min_points_per_centroid=1,
                )
                km.train(members)
                cents = np.asarray(km.centroids, dtype=np.float32)
            else:
                cents = members.mean(axis=0, keepdims=True)
            cents = cents / np.maximum(np.linalg.norm(cents, axis=1, keepdims=True), 1e-12)
            centroids.append(cents)
            owner.extend([c] * len(cents))
        return cls(categories, np.vstack(centroids), np.asarray(owner), temperature)

    @classmethod
    def fit_calibrated(
        cls,
        vectors: np.ndarray,
        labels: np.ndarray,
        categories: list[str],
        *,
        max_subcentroids: int = 4,
        holdout: float = 0.2,
        seed: int = 0,
    ) -> CentroidRouter:
        """Fit centroids on part of the catalogue, choose the temperature that minimises the negative
        log-likelihood of the held-out part, then refit the centroids on everything with that temperature."""
        rng = np.random.default_rng(seed)
        held = rng.random(len(vectors)) < holdout
        # Keep every category represented in the fitting part.
        for c in range(len(categories)):
            idx = np.flatnonzero(labels == c)
            if not (~held[idx]).any():
                held[idx[0]] = False
        temperature = 0.05
        if held.sum() >= 10:
            draft = cls.fit(vectors[~held], labels[~held], categories, max_subcentroids=max_subcentroids, seed=seed)
            scores = draft.category_scores(vectors[held])
            truth = labels[held]
            best_nll = np.inf
            for t in np.geomspace(0.005, 1.0, 40):
                logp = np.log(np.maximum(softmax(scores / t)[np.arange(len(truth)), truth], 1e-12))
                nll = float(-logp.mean())
                if nll < best_nll:
                    best_nll, temperature = nll, float(t)
        return cls.fit(
            vectors, labels, categories, max_subcentroids=max_subcentroids, temperature=temperature, seed=seed
        )

    def save(self, path: Path) -> None:
        with path.open("wb") as fh:
            np.savez(
                fh,
                format=np.asarray(ROUTER_FORMAT),
                categories=np.asarray(self._categories, dtype=str),
                centroids=self._centroids,
                owner=self._owner,
                temperature=np.asarray(self.temperature, dtype=np.float64),
            )

    @classmethod
    def load(cls, path: Path) -> CentroidRouter:
        try:
            with np.load(path, allow_pickle=False) as data:
                fmt = str(data["format"])
                if fmt != ROUTER_FORMAT:
                    raise ArtifactError(f"router {path}: format expected {ROUTER_FORMAT}, got {fmt}")
                return cls(
                    [str(c) for c in data["categories"]],
                    data["centroids"],
                    data["owner"],
                    float(data["temperature"]),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ArtifactError(f"router {path}: cannot read it ({type(exc).__name__})") from exc
