"""Category router: which shards to search for a query. Stored in `router.npz` (no pickle), one of two kinds:

- `PrototypeRouter` (the build's default): a few spherical k-means prototypes per category (every image of a
  small category); a category's logit is the best cosine among its prototypes, softmax with a fitted temperature.
- `LinearRouter`: a class-balanced softmax classifier over embeddings (categories with too few images keep
  centroid weights), temperature-scaled.

Why prototypes by default (grocery, grocery-lite0-ms512, train catalogue, `python scripts/compare_routers.py`): router
top-1 on val 0.865 against the linear router's 0.841, and the build's own measurement on held-out groups agrees
with val (0.865 and 0.865; the linear router measured 0.873 for 0.841), so its probing policy is chosen on
figures that hold for real queries. Both calibrate through app/offline/routing/calibrate.py.
Shards are probed in descending probability until the cumulative mass reaches `probe_mass` or `max_probes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.errors import ArtifactError

LINEAR_FORMAT = "linear-v1"
PROTOTYPE_FORMAT = "prototype-v1"


class Router(Protocol):
    """Port: a unit query vector in, one probability per category out (same order as `categories`)."""

    @property
    def categories(self) -> list[str]: ...

    @property
    def dim(self) -> int: ...

    def probabilities(self, query: np.ndarray) -> np.ndarray: ...


class FittedRouter(Router, Protocol):
    """What the build measures and stores: logits for many queries, a temperature it sets, a file it writes."""

    temperature: float
    kind: str

    def logits(self, queries: np.ndarray) -> np.ndarray: ...

    def predict_proba(self, queries: np.ndarray) -> np.ndarray: ...

    def save(self, path: Path) -> None: ...


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


class _SoftmaxRouter:
    """What both routers share: categories, a temperature over their logits, and the npz they are saved as."""

    kind = ""
    format = ""

    def __init__(self, categories: list[str], temperature: float) -> None:
        if temperature <= 0 or not np.isfinite(temperature):
            raise ValueError("temperature must be a positive number")
        self._categories = list(categories)
        self.temperature = float(temperature)

    @property
    def categories(self) -> list[str]:
        return self._categories

    def logits(self, queries: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probabilities(self, query: np.ndarray) -> np.ndarray:
        out: np.ndarray = softmax(self.logits(query)[0] / self.temperature)
        return out

    def predict_proba(self, queries: np.ndarray) -> np.ndarray:
        out: np.ndarray = softmax(self.logits(queries) / self.temperature)
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def save(self, path: Path) -> None:
        arrays: dict[str, Any] = {  # Any: numpy's stubs type **kwds against savez's allow_pickle keyword
            "format": np.asarray(self.format),
            "categories": np.asarray(self._categories, dtype=str),
            "temperature": np.asarray(self.temperature, dtype=np.float64),
            **self._arrays(),
        }
        with path.open("wb") as fh:
            np.savez(fh, **arrays)


class LinearRouter(_SoftmaxRouter):
    kind, format = "linear", LINEAR_FORMAT

    def __init__(self, categories: list[str], weights: np.ndarray, bias: np.ndarray, temperature: float) -> None:
        if weights.shape[0] != len(categories) or bias.shape != (len(categories),):
            raise ValueError("weights, bias and categories disagree")
        super().__init__(categories, temperature)
        self._w = np.ascontiguousarray(weights, dtype=np.float32)
        self._b = bias.astype(np.float32)

    @property
    def dim(self) -> int:
        return int(self._w.shape[1])

    def logits(self, queries: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.atleast_2d(queries).astype(np.float32) @ self._w.T + self._b
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self._w, "bias": self._b}


class PrototypeRouter(_SoftmaxRouter):
    """Nearest-prototype router: `prototypes` (unit rows) grouped by category, category c owning rows
    `offsets[c]:offsets[c + 1]` (every category at least one)."""

    kind, format = "prototype", PROTOTYPE_FORMAT

    def __init__(self, categories: list[str], prototypes: np.ndarray, offsets: np.ndarray, temperature: float) -> None:
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.shape != (len(categories) + 1,) or offsets[0] != 0 or offsets[-1] != len(prototypes):
            raise ValueError("prototype offsets and categories disagree")
        if (np.diff(offsets) < 1).any():
            raise ValueError("every category needs at least one prototype")
        super().__init__(categories, temperature)
        self._p = np.ascontiguousarray(prototypes, dtype=np.float32)
        self._offsets = offsets

    @property
    def dim(self) -> int:
        return int(self._p.shape[1])

    @property
    def n_prototypes(self) -> int:
        return int(self._p.shape[0])

    def logits(self, queries: np.ndarray) -> np.ndarray:
        """Per category, the best cosine among its prototypes (one matrix product and a segmented max)."""
        sims = np.atleast_2d(queries).astype(np.float32) @ self._p.T
        out: np.ndarray = np.maximum.reduceat(sims, self._offsets[:-1], axis=1)
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {"prototypes": self._p, "offsets": self._offsets}


def load_router(path: Path) -> LinearRouter | PrototypeRouter:
    """Load router.npz (no pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            fmt = str(data["format"])
            categories = [str(c) for c in data["categories"]]
            temperature = float(data["temperature"])
            if fmt == LINEAR_FORMAT:
                return LinearRouter(categories, data["weights"], data["bias"], temperature)
            if fmt == PROTOTYPE_FORMAT:
                return PrototypeRouter(categories, data["prototypes"], data["offsets"], temperature)
    except (OSError, KeyError, ValueError) as exc:
        raise ArtifactError(f"router {path}: cannot read it ({type(exc).__name__})") from exc
    raise ArtifactError(f"router {path}: unknown format {fmt!r}")
