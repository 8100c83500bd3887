"""SKU recall against hand-computed values."""

from __future__ import annotations

import numpy as np

from app.pipeline.evaluation import sku_recall


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
