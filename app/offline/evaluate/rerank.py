"""Re-ranking by neighbourhood averaging (Radenovic et al. 2018, "Fine-tuning CNN image retrieval"):

- alpha-QE (query side): the query is replaced by a weighted mean of itself and its top-n hits, weights sim^alpha,
  and searched again.
- DBA (database side, at build time): every catalogue vector is replaced by the same weighted mean over its own
  top-k neighbours (itself first).

Both assume L2-normalised float32 vectors and cosine similarity. Measured offline only
(scripts/measure_embedding_tricks.py): on the grocery val photos neither paid, so neither is a service option."""

from __future__ import annotations

import numpy as np


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


def weighted_mean(anchor: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """normalise(anchor + sum_j max(sim_j, 0)^alpha * neighbour_j), row-wise: anchor (n, d), neighbours (n, m, d)."""
    w = np.clip(sims, 0.0, None) ** alpha
    return _normalise(anchor + np.einsum("nm,nmd->nd", w, neighbours))


def query_expansion(queries: np.ndarray, catalogue: np.ndarray, n: int, alpha: float = 3.0) -> np.ndarray:
    """alpha-QE against an exact scan of `catalogue` (the offline measurement; the service expands with the hits'
    stored vectors)."""
    sims = queries @ catalogue.T
    top = np.argsort(-sims, axis=1)[:, :n]
    return weighted_mean(queries, catalogue[top], np.take_along_axis(sims, top, axis=1), alpha)


def database_side_augmentation(catalogue: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    """alpha-DBA over the top-k neighbours of each vector, itself included (so k=1 changes nothing)."""
    sims = catalogue @ catalogue.T
    top = np.argsort(-sims, axis=1)[:, 1:k]  # column 0 is the vector itself (sim 1)
    return weighted_mean(catalogue, catalogue[top], np.take_along_axis(sims, top, axis=1), alpha)
