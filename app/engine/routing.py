"""Category router: which shards to search for a query.

`LinearRouter`, stored in `router.npz` (no pickle): a softmax classifier over embeddings, trained with
class-balanced cross-entropy and temperature-scaled (app/offline/routing/calibrate.py). Categories with too few
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
