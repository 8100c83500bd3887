"""Learnt router, temperature, probe-mass choice, open-set thresholds and k-means categories."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from app.artifacts.manifest import read_manifest, resolve_current
from app.engine.routing import LinearRouter, Probe, PrototypeRouter, load_router, select_probes, softmax
from app.engine.search import SearchEngine, SearchParams, Shard
from app.offline.build.build_index import BuildOptions, build_index
from app.offline.routing.calibrate import (
    MIN_POLICY_QUERIES,
    RouterReport,
    _choose_policy,
    fill_shards,
    grouped_holdout,
    near_duplicate_groups,
    threshold_for_precision,
    train_router,
)
from app.offline.routing.fit import fit_linear_router, fit_prototype_router, fit_temperature


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def test_near_duplicates_are_grouped_transitively() -> None:
    base = np.eye(8, dtype=np.float32)
    # Rows 0-2 a chain of near-copies (0~1, 1~2; 0 and 2 further apart), row 3 on its own, rows 4-5 a pair.
    x = _unit(
        np.stack([base[0], base[0] + 0.5 * base[1], base[0] + base[1], base[2], base[3], base[3] + 0.1 * base[4]])
    )
    groups = near_duplicate_groups(x, 0.85)
    assert groups[0] == groups[1] == groups[2] and groups[4] == groups[5]
    assert len({groups[0], groups[3], groups[4]}) == 3


def test_holdout_takes_whole_groups_and_leaves_every_sku_something_to_fit() -> None:
    rng = np.random.default_rng(0)
    # SKU a: three bursts of 4 near-identical shots each; SKU b: one burst of 5 (never held out: one group);
    # SKU c: a single photo (never held out).
    centres = _unit(rng.normal(size=(4, 32)))
    bursts = [
        np.repeat(centres[i : i + 1], n, axis=0) + rng.normal(scale=0.01, size=(n, 32))
        for i, n in ((0, 4), (1, 4), (2, 4), (3, 5))
    ]
    x = _unit(np.vstack([*bursts, rng.normal(size=(1, 32))]))
    skus = ["a"] * 12 + ["b"] * 5 + ["c"]
    held = grouped_holdout(x, skus, fraction=0.2)
    a_held = held[:12].reshape(3, 4)
    assert a_held.all(axis=1).sum() == 1 and (a_held.any(axis=1) == a_held.all(axis=1)).all()  # one whole burst
    assert not held[12:].any()


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
    router = fit_linear_router(x, labels, ["a", "b", "tiny"], min_images=5)
    probs = router.predict_proba(x)
    assert (probs.argmax(axis=1) == labels).mean() > 0.97
    assert (probs[labels == 2].argmax(axis=1) == 2).all()
    router.save(tmp_path / "r.npz")
    loaded = load_router(tmp_path / "r.npz")
    assert isinstance(loaded, LinearRouter)
    assert np.allclose(loaded.probabilities(x[0]), router.probabilities(x[0]))


def test_prototype_router_keeps_small_categories_whole_and_round_trips(tmp_path: Path) -> None:
    x, labels = _clusters((200, 40, 3))
    router = fit_prototype_router(x, labels, ["a", "b", "tiny"], per_category=16)
    assert router.n_prototypes == 16 + 16 + 3  # a category of 3 images keeps all three
    logits = router.logits(x)
    # A category's logit is the best cosine among its prototypes: never below the cosine to any of its own
    # images' prototypes, and a tiny category's prototypes are its images, so they score themselves 1.0.
    assert np.allclose(logits[labels == 2, 2], 1.0, atol=1e-5)
    assert (logits.argmax(axis=1) == labels).mean() > 0.97
    router.temperature = 0.05
    router.save(tmp_path / "r.npz")
    loaded = load_router(tmp_path / "r.npz")
    assert isinstance(loaded, PrototypeRouter) and loaded.temperature == 0.05
    assert np.allclose(loaded.predict_proba(x[:5]), router.predict_proba(x[:5]))
    assert np.isclose(loaded.probabilities(x[0]).sum(), 1.0)


def test_prototype_router_rejects_inconsistent_offsets() -> None:
    protos = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError):
        PrototypeRouter(["a", "b"], protos, np.asarray([0, 4, 4]), 1.0)  # b owns nothing
    with pytest.raises(ValueError):
        PrototypeRouter(["a", "b"], protos, np.asarray([0, 2]), 1.0)


def test_train_router_chooses_probe_mass_within_the_loss_budget() -> None:
    x, labels = _clusters((50, 50, 50, 50))
    skus = [f"{c}-{i % 5}" for i, c in enumerate(labels)]
    router, report = train_router(x, labels, ["a", "b", "c", "d"], skus, max_loss=0.005, exhaustive_below=0)
    assert report.routing_loss_points <= 0.5 and report.routing_loss5_points <= 0.5
    # 3 draws of 20 % to half of the photos each
    assert 3 * 40 <= report.calibration_queries <= 3 * 100 and report.router_top1 > 0.95
    assert report.policy_reason.startswith("the smallest probe_mass")
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
    assert m.router_report["kind"] == "prototype"  # the build's default
    assert m.probe_mass == m.router_report["probe_mass"] and m.max_probes == m.router_report["max_probes"]
    # A tiny index is searched whole, and the manifest says why.
    assert m.probe_mass == 1.0 and m.max_probes == len(m.categories)
    assert "cheap to search whole" in m.router_report["policy_reason"]
    assert set(m.thresholds) == {"apple", "juice", "milk"}


def test_small_indexes_and_unmeasurable_routers_search_every_shard() -> None:
    x, labels = _clusters((50, 50, 50, 50))
    skus = [f"{c}-{i % 5}" for i, c in enumerate(labels)]
    names = ["a", "b", "c", "d"]
    _, small = train_router(x, labels, names, skus)  # 200 vectors: below the cost model's bound
    assert small.probe_mass == 1.0 and small.max_probes == 4 and "cheap to search whole" in small.policy_reason
    # One photo per SKU: nothing can be held out, so nothing measures the router.
    one = [f"{c}-{i}" for i, c in enumerate(labels)]
    _, unmeasured = train_router(x, labels, names, one, exhaustive_below=0)
    assert unmeasured.calibration_queries < MIN_POLICY_QUERIES
    assert unmeasured.probe_mass == 1.0 and "photos to measure the router" in unmeasured.policy_reason
    # Every SKU one burst of near-copies: single photos calibrate thresholds, but not the probing policy.
    burst = np.repeat(x[labels == 0][:1], 40, axis=0) + np.random.default_rng(0).normal(scale=1e-3, size=(40, 16))
    bx = np.vstack([_unit(burst + np.eye(16)[c]) for c in range(4)])
    blabels = np.repeat(np.arange(4), 40)
    _, copies = train_router(bx, blabels, names, [f"s{c}" for c in blabels], exhaustive_below=0)
    assert copies.calibration_queries == 32 and copies.calibration_source.startswith("held-out single")
    assert copies.probe_mass == 1.0 and "near-copies" in copies.policy_reason


def test_a_router_that_loses_recall_at_every_mass_searches_every_shard() -> None:
    rng = np.random.default_rng(1)
    # 40 SKUs at random places in 8 dimensions, 10 photos each; a SKU's category is random, so no linear router
    # can tell the 4 categories apart and routing to a few shards loses SKUs at every probe_mass.
    centres = _unit(rng.normal(size=(40, 8)))
    sku_ids = np.repeat(np.arange(40), 10)
    x = _unit(centres[sku_ids] + rng.normal(scale=0.3, size=(400, 8)))
    labels = rng.integers(0, 4, 40)[sku_ids]
    _, report = train_router(
        x, labels, ["a", "b", "c", "d"], [f"s{i}" for i in sku_ids], max_probes=2, exhaustive_below=0
    )
    assert report.probe_mass == 1.0 and report.max_probes == 4
    assert "no probe_mass" in report.policy_reason
    assert report.summary().startswith("router top-1 ") and "every shard (4)" in report.summary()


def test_the_build_fills_k_as_the_service_does() -> None:
    """The shards the build's measurement searches (fill_shards) are the ones SearchEngine searches: the router's
    choice, then the next shards in probability order until they hold k SKUs."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        n = int(rng.integers(2, 12))
        probs = rng.dirichlet(np.ones(n))
        shard_skus = rng.integers(1, 4, n)
        k = int(rng.integers(1, 12))
        chosen = [p.category for p in select_probes(probs, probe_mass=float(rng.uniform(0.3, 1.0)), max_probes=3)]
        engine = SearchEngine.__new__(SearchEngine)
        engine.shards = [Shard(f"c{i}", 0, None, n_skus=int(c)) for i, c in enumerate(shard_skus)]  # type: ignore[arg-type]
        params = SearchParams(k=k, fill_max_probes=n)
        added: list[Probe] = []
        found = min(k, int(shard_skus[chosen].sum()))  # exact search, nothing filtered: every SKU comes back
        while found < k and (more := engine.fill_probes(probs, [Probe(c, 0.0) for c in chosen], added, found, params)):
            added += more
            found = min(k, found + int(sum(shard_skus[p.category] for p in more)))
        assert fill_shards(probs, chosen, shard_skus, k) == chosen + [p.category for p in added]


def test_the_policy_is_the_smallest_mass_within_both_losses() -> None:
    report = RouterReport(
        kind="linear",
        temperature=1.0,
        fallback_categories=[],
        calibration_queries=500,
        router_top1=0.9,
        router_top3=0.98,
        probe_mass=0.999,
        max_probes=8,
        exhaustive_recall1=0.8,
        routed_recall1=0.8,
        routing_loss_points=0.0,
        mean_shards=4.0,
        candidates=[
            {
                "probe_mass": 0.5,
                "recall1": 0.78,
                "recall5": 0.95,
                "loss1_points": 2.0,
                "loss5_points": 0.0,
                "shards": 1.0,
            },
            {
                "probe_mass": 0.8,
                "recall1": 0.797,
                "recall5": 0.93,
                "loss1_points": 0.3,
                "loss5_points": 2.0,
                "shards": 1.5,
            },
            {
                "probe_mass": 0.9,
                "recall1": 0.797,
                "recall5": 0.948,
                "loss1_points": 0.3,
                "loss5_points": 0.2,
                "shards": 2.0,
            },
            {
                "probe_mass": 0.99,
                "recall1": 0.8,
                "recall5": 0.95,
                "loss1_points": 0.0,
                "loss5_points": 0.0,
                "shards": 3.0,
            },
        ],
    )
    _choose_policy(report, ["a"] * 10, n_vectors=50_000, max_loss=0.005, exhaustive_below=1000, measurable=True)
    assert report.probe_mass == 0.9 and report.mean_shards == 2.0 and report.routing_loss5_points == 0.2


def test_the_report_says_which_categories_fall_back_to_the_global_threshold() -> None:
    x, labels = _clusters((50, 50, 50, 50))
    skus = [f"{c}" for c in labels]  # one SKU per category: a known query's top hit is right, an unknown's is not
    names = ["a", "b", "c", "d"]
    _, strict = train_router(x, labels, names, skus, min_threshold_samples=10_000)
    assert sorted(strict.threshold_fallback) == names  # no category has 10,000 samples
    assert set(strict.thresholds.values()) == {strict.global_threshold}
    assert sum(strict.threshold_samples.values()) == 2 * strict.calibration_queries  # a known and an unknown each
    _, loose = train_router(x, labels, names, skus, min_threshold_samples=1)
    own = [n for n in names if n not in loose.threshold_fallback]
    assert own and all(loose.threshold_samples[n] >= 1 for n in own)
