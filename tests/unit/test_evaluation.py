"""SKU recall against hand-computed values."""

from __future__ import annotations

import numpy as np

from app.offline.evaluate.metrics import sku_recall, top_skus


def test_sku_recall_hand_computed() -> None:
    # Catalogue: 4 images of 3 SKUs on the unit circle; queries at known angles.
    ang = np.deg2rad([0, 10, 90, 180])
    cat = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    skus = ["a", "a", "b", "c"]
    q_ang = np.deg2rad([5, 80, 170, 100])
    queries = np.stack([np.cos(q_ang), np.sin(q_ang)], axis=1)
    # q0 -> a (then b, c): hit@1. q1 -> b, a, c: truth a: miss@1, hit@2. q2 -> c, b, a: truth b: hit@2.
    # q3 -> b, c, a: truth c: hit@2.
    rec = sku_recall(queries, ["a", "a", "b", "c"], cat, skus, (1, 2, 3))
    assert rec == {1: 0.25, 2: 1.0, 3: 1.0}


def test_duplicate_images_of_one_sku_count_once() -> None:
    cat = np.array([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0]])
    rec = sku_recall(np.array([[0.0, 1.0]]), ["b"], cat, ["a", "a", "b"], (1,))
    assert rec == {1: 1.0}
    rec = sku_recall(np.array([[1.0, 0.0]]), ["b"], cat, ["a", "a", "b"], (1, 2))
    assert rec == {1: 0.0, 2: 1.0}  # the second image of "a" does not push "b" down to rank 3


def test_no_queries() -> None:
    assert sku_recall(np.empty((0, 2)), [], np.eye(2), ["a", "b"], (1, 5)) == {1: 0.0, 5: 0.0}


def test_recall_precision_map_hand_computed() -> None:
    from app.offline.evaluate.metrics import map_at_k, precision_at_k, recall_at_k

    ranked = [["a", "b", "c"], ["b", "a"], ["c", "d", "e"], []]
    truth = ["a", "a", "x", "a"]  # ranks: 1, 2, absent, empty answer
    assert recall_at_k(ranked, truth, 1) == 0.25
    assert recall_at_k(ranked, truth, 2) == 0.5
    assert precision_at_k(ranked, truth, 2) == (0.5 + 0.5) / 4
    assert map_at_k(ranked, truth, 10) == (1 + 0.5) / 4
    assert recall_at_k([], [], 5) == 0.0


def test_classification_report_with_zero_support_and_never_predicted() -> None:
    from app.offline.evaluate.metrics import classification_report, confusion_matrix

    # Classes: 0 (3 samples), 1 (1 sample), 2 (no samples, predicted once).
    m = confusion_matrix([0, 0, 0, 1], [0, 0, 2, 0], 3)
    assert m.tolist() == [[2, 0, 1], [1, 0, 0], [0, 0, 0]]
    rep = classification_report(m, ["a", "b", "c"])
    assert rep["a"] == {"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3}
    assert rep["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rep["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rep["micro avg"]["precision"] == 0.5
    assert rep["macro avg"]["recall"] == (2 / 3 + 0) / 2  # c has no support: left out
    assert rep["weighted avg"]["recall"] == (2 / 3 * 3 + 0) / 4


def test_overlap_and_pr_curve() -> None:
    from app.offline.evaluate.metrics import overlap_at_k, pr_curve

    assert overlap_at_k([np.array([1, 2, 3])], [np.array([3, 2, 9])], 3) == 2 / 3
    curve = pr_curve(np.array([0.9, 0.8, 0.8, 0.5]), np.array([True, False, True, False]))
    assert curve["threshold"] == [0.9, 0.8, 0.5]  # the tie at 0.8 is one point
    assert curve["precision"] == [1.0, 2 / 3, 0.5]
    assert curve["recall"] == [0.5, 1.0, 1.0]


def test_top_skus_matches_a_full_stable_sort_on_large_catalogues() -> None:
    """The partial sort must give exactly what a stable full sort gives, ties and masked entries included."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(1, 3000))
        scores = np.round(rng.normal(size=n), 1)  # coarse: many ties
        scores[rng.random(n) < 0.1] = -np.inf
        skus = [f"s{x}" for x in rng.integers(0, 1 + trial % 50, size=n)]
        full: list[str] = []
        for j in np.argsort(-scores, kind="stable"):
            if np.isneginf(scores[j]):
                break
            if skus[j] not in full:
                full.append(skus[j])
        for k in (1, 5, 10):
            assert top_skus(scores, skus, k) == full[:k]
