from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.engine.routing import load_router, select_probes
from app.errors import ArtifactError
from app.offline.routing.fit import sample_per_class


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


def test_probe_mass_one_takes_max_probes_even_when_one_category_has_all_the_mass() -> None:
    probs = np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)  # an overconfident router, rounded in float32
    assert len(select_probes(probs, probe_mass=1.0, max_probes=4)) == 4
    assert len(select_probes(probs, probe_mass=0.999, max_probes=4)) == 1


def test_ties_keep_category_order() -> None:
    probs = np.array([0.25, 0.25, 0.25, 0.25])
    assert [p.category for p in select_probes(probs, probe_mass=0.5, max_probes=4)] == [0, 1]


def test_corrupt_router_is_refused(tmp_path: Path) -> None:
    (tmp_path / "router.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError):
        load_router(tmp_path / "router.npz")


def test_router_fit_samples_large_categories_and_keeps_small_ones() -> None:
    labels = np.asarray([0] * 3000 + [1] * 10 + [2] * 999)
    keep = sample_per_class(labels, 1000, np.random.default_rng(0))
    assert np.bincount(labels[keep]).tolist() == [1000, 10, 999]
    assert (np.diff(keep) > 0).all()  # original order
    same = sample_per_class(labels[3000:], 1000, np.random.default_rng(0))
    assert same.tolist() == list(range(1009))  # nothing to sample: everything, untouched
