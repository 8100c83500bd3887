"""Learnt router, temperature, probe-mass choice, open-set thresholds and k-means categories."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from app.index.manifest import read_manifest, resolve_current
from app.pipeline.build_index import BuildOptions, build_index
from app.pipeline.router_training import holdout_mask, threshold_for_precision, train_router
from app.router import LinearRouter, fit_temperature, load_router, softmax


def test_holdout_takes_the_last_photos_of_each_sku() -> None:
    skus = ["a"] * 5 + ["b"] * 1 + ["c"] * 2 + ["a"]
    # a: 6 photos -> last ceil(1.2)=2 held (rows 4 and 8); b: single photo never held; c: 2 -> 1 held (row 7).
    assert holdout_mask(skus).nonzero()[0].tolist() == [4, 7, 8]


def test_threshold_for_precision_hand_computed() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([True, True, False, True, False])
    # precision at each cut: 1, 1, 2/3, 3/4, 3/5
    assert threshold_for_precision(scores, correct, 0.75) == 0.6
    assert threshold_for_precision(scores, correct, 0.9) == 0.8
    assert threshold_for_precision(scores, np.zeros(5, dtype=bool), 0.5) is None


def test_threshold_respects_ties() -> None:
    scores = np.array([0.9, 0.7, 0.7])
    correct = np.array([True, True, False])
    # Accepting 0.7 accepts both tied answers (precision 2/3), so the threshold for 0.9 precision is 0.9.
    assert threshold_for_precision(scores, correct, 0.9) == 0.9


def test_temperature_fits_overconfident_logits() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 500)
    logits = rng.normal(size=(500, 3))
    logits[np.arange(500), labels] += 1.0
    t = fit_temperature(logits * 10, labels)  # logits 10x too confident: the fitted T is about 10
    assert 5 < t < 20


def _clusters(n_per: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(n_per)])
    centres = np.eye(16)[: len(n_per)]
    x = centres[labels] + rng.normal(scale=0.15, size=(len(labels), 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_linear_router_with_a_fallback_category(tmp_path: Path) -> None:
    x, labels = _clusters((60, 40, 3))  # category 2 has too few images: nearest-centroid fallback
    router = LinearRouter.fit(x, labels, ["a", "b", "tiny"], min_images=5)
    probs = router.predict_proba(x)
    assert (probs.argmax(axis=1) == labels).mean() > 0.97
    assert (probs[labels == 2].argmax(axis=1) == 2).all()
    router.save(tmp_path / "r.npz")
    loaded = load_router(tmp_path / "r.npz")
    assert isinstance(loaded, LinearRouter)
    assert np.allclose(loaded.probabilities(x[0]), router.probabilities(x[0]))


def test_train_router_chooses_probe_mass_within_the_loss_budget() -> None:
    x, labels = _clusters((50, 50, 50, 50))
    skus = [f"{c}-{i % 5}" for i, c in enumerate(labels)]
    router, report = train_router(x, labels, ["a", "b", "c", "d"], skus, max_loss=0.005)
    assert report.routing_loss_points <= 0.5
    assert report.calibration_queries == 40 and report.router_top1 > 0.95
    assert report.probe_mass in [c["probe_mass"] for c in report.candidates]
    assert 1.0 <= report.mean_shards <= 4.0
    assert set(report.thresholds) == {"a", "b", "c", "d"}
    assert np.isclose(softmax(router.logits(x[:1])[0] / router.temperature).sum(), 1.0)


def test_catalogue_without_categories_is_clustered(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    with catalogue.open() as fh:
        rows = list(csv.DictReader(fh))
    no_cat = tmp_path / "nocat.csv"
    with no_cat.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["sku", "image"])
        w.writeheader()
        w.writerows({"sku": r["sku"], "image": r["image"]} for r in rows)
    build_index(no_cat, catalogue.parent, tmp_path / "idx", tiny_model, BuildOptions(progress=False))
    manifest = read_manifest(resolve_current(tmp_path / "idx"))
    assert manifest.category_source == "kmeans"
    assert all(c.name.startswith("cluster-") for c in manifest.categories)
    assert len(manifest.categories) == manifest.build.n_clusters == 2  # 6 SKUs: candidates k <= 6 // 3
    # A SKU never spans two shards.
    assert sum(c.n_skus for c in manifest.categories) == 6


@pytest.mark.parametrize("backend", ["faiss"])
def test_manifest_records_router_choices(faiss_index: Path, backend: str) -> None:
    m = read_manifest(resolve_current(faiss_index))
    assert m.router_report["kind"] == "linear"
    assert m.probe_mass == m.router_report["probe_mass"] and m.max_probes == 8
    assert set(m.thresholds) == {"apple", "juice", "milk"}
