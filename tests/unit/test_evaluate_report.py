"""`vps evaluate` end to end on the tiny index: the report's numbers and a self-contained HTML page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.offline.datasets.catalogue import write_catalogue
from tests.helpers import SKUS, encode, product_image

pytest.importorskip("matplotlib", reason="the eval extra (matplotlib) is not installed")


def test_evaluate_writes_json_and_offline_html(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    from app.offline.evaluate.job import evaluate_index

    rows = []
    for sku, (category, _, _) in SKUS.items():
        (tmp_path / f"{sku}.jpg").write_bytes(encode(product_image(sku, 50)))
        rows.append({"sku": sku, "category": category, "image": f"{sku}.jpg"})
    write_catalogue(tmp_path / "queries.csv", rows)
    report = evaluate_index(
        faiss_index, tiny_model, tmp_path / "queries.csv", tmp_path, tmp_path / "out", progress=False
    )
    assert report["queries"] == 6 and report["queries_failed"] == []
    assert report["retrieval"]["recall@1"] == 1.0 and report["exact"]["recall@1"] == 1.0
    assert report["routing"]["top1_accuracy"] == 1.0
    assert report["ann_recall@10"] == 1.0  # 18 vectors: HNSW is exact here
    assert sum(sum(r) for r in report["routing"]["confusion_matrix"]) == 6
    # 6 SKUs in the catalogue, k=10: every answer holds all 6, and the counts say so.
    assert report["routing"]["result_count_distribution"] == {"6": 6}
    assert sum(report["routing"]["shards_chosen_distribution"].values()) == 6
    assert report["routing"]["recall@5_loss_points"] == 0.0 and report["routing"]["policy_reason"]
    assert set(report["latency_ms"]) == {"decode", "embed", "route", "search", "group"}
    assert json.loads((tmp_path / "out" / "report.json").read_text())["queries"] == 6
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page
