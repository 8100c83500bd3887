from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.errors import ArtifactError
from app.router import CentroidRouter, load_router, select_probes


def test_probes_until_mass_is_reached() -> None:
    probs = np.array([0.05, 0.6, 0.3, 0.05])
    assert [p.category for p in select_probes(probs, probe_mass=0.5, max_probes=4)] == [1]
    assert [p.category for p in select_probes(probs, probe_mass=0.9, max_probes=4)] == [1, 2]
    assert [p.category for p in select_probes(probs, probe_mass=0.95, max_probes=4)] == [1, 2, 0]


def test_probes_stop_at_max_probes_and_take_at_least_one() -> None:
    probs = np.full(10, 0.1)
    assert len(select_probes(probs, probe_mass=1.0, max_probes=3)) == 3
    assert len(select_probes(probs, probe_mass=1.0, max_probes=10)) == 10
    assert len(select_probes(probs, probe_mass=0.01, max_probes=3)) == 1


def test_ties_keep_category_order() -> None:
    probs = np.array([0.25, 0.25, 0.25, 0.25])
    assert [p.category for p in select_probes(probs, probe_mass=0.5, max_probes=4)] == [0, 1]


def _clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(8, dtype=np.float32)[:3]
    labels = np.repeat(np.arange(3), 60)
    x = centres[labels] + rng.normal(scale=0.2, size=(180, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), labels


def test_centroid_router_routes_to_the_right_category() -> None:
    x, labels = _clusters()
    router = CentroidRouter.fit_calibrated(x, labels, ["a", "b", "c"], max_subcentroids=2)
    probs = np.stack([router.probabilities(v) for v in x])
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == labels).mean() > 0.95
    assert 0.005 <= router.temperature <= 1.0


def test_router_round_trips_without_pickle(tmp_path: Path) -> None:
    x, labels = _clusters()
    router = CentroidRouter.fit(x, labels, ["a", "b", "c"], max_subcentroids=3, min_points_per_centroid=20)
    router.save(tmp_path / "router.npz")
    loaded = load_router(tmp_path / "router.npz")
    assert loaded.categories == ["a", "b", "c"]
    assert np.allclose(loaded.probabilities(x[0]), router.probabilities(x[0]))


def test_corrupt_router_is_refused(tmp_path: Path) -> None:
    (tmp_path / "router.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError):
        load_router(tmp_path / "router.npz")
