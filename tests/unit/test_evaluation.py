"""Evaluation metrics against hand-computed values, and how offline jobs report progress."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest

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


def test_ann_recall_counts_by_score_so_ties_are_not_misses() -> None:
    from app.offline.evaluate.metrics import ann_recall

    scores = np.array([0.9, 0.8, 0.8, 0.5, 0.1])  # rows 1 and 2: the same photo twice
    assert ann_recall(np.array([0, 1]), scores, 2) == 1.0
    assert ann_recall(np.array([0, 2]), scores, 2) == 1.0  # the tied twin is just as near: a hit
    assert ann_recall(np.array([0, 3]), scores, 2) == 0.5  # a real miss
    assert ann_recall(np.array([0]), scores, 2) == 0.5  # an answer short of k misses the rest
    assert ann_recall(np.array([3, 3, 3]), scores, 3) == 0.0  # a row counts once
    assert ann_recall(np.array([1, 0]), np.array([0.9, 0.1]), 10) == 1.0  # fewer rows than k: all of them
    # A float-rounding swap at the k-th place (faiss and numpy add in another order) is within the tolerance.
    assert ann_recall(np.array([0, 2]), np.array([0.9, 0.7000001, 0.7]), 2) == 1.0


def test_pr_curve() -> None:
    from app.offline.evaluate.metrics import pr_curve

    curve = pr_curve(np.array([0.9, 0.8, 0.8, 0.5]), np.array([True, False, True, False]))
    assert curve["threshold"] == [0.9, 0.8, 0.5]  # the tie at 0.8 is one point
    assert curve["precision"] == [1.0, 2 / 3, 0.5]
    assert curve["recall"] == [0.5, 1.0, 1.0]


def test_progress_in_a_log_file_is_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Not a terminal: no bar (tqdm's carriage returns would pile up in the file), a plain line now and then."""
    from app.offline.progress import progress

    out = io.StringIO()  # a file: isatty() is False
    with caplog.at_level(logging.INFO, logger="app.offline.progress"):
        assert list(progress(range(50), desc="embedding", unit="img", every_s=0, stream=out)) == list(range(50))
        with progress(total=3, desc="shards", stream=out, every_s=3600) as bar:
            bar.update(2)
            bar.update(1)
        assert list(progress(range(5), desc="quiet", enabled=False, stream=out)) == list(range(5))
    assert out.getvalue() == ""  # nothing drawn
    lines = [r.getMessage() for r in caplog.records]
    assert all("\r" not in line for line in lines)
    assert lines[0].startswith("embedding: 1/50 img (2 %)") and lines[-2].startswith("embedding: 50/50 img (100 %)")
    assert lines[-1].startswith("shards: 3/3 it (100 %)")  # only the closing line within an hour
    assert not any(line.startswith("quiet") for line in lines)


def test_progress_on_a_terminal_is_tqdm_s_bar() -> None:
    from app.offline.progress import progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    assert sum(progress(range(3), desc="evaluating", unit="query", stream=out)) == 3
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()


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
