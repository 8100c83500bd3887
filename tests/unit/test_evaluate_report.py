"""`vps evaluate` end to end on the tiny index: the report's numbers, a self-contained HTML page with readable
plots, and a complete report without matplotlib (the serving install has none)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.offline.build.build_index import BuildOptions, build_index
from app.offline.datasets.catalogue import write_catalogue
from tests.helpers import SKUS, encode, make_catalogue, product_image

ROOT = Path(__file__).resolve().parents[2]
# Runs `vps evaluate` as the serving install would: `import matplotlib` raises ImportError.
_NO_MATPLOTLIB = "import sys; sys.modules['matplotlib'] = None; from app.cli import main; sys.argv[0] = 'vps'; main()"


def _queries(root: Path) -> Path:
    rows = []
    for sku, (category, _, _) in SKUS.items():
        (root / f"{sku}.jpg").write_bytes(encode(product_image(sku, 50)))
        rows.append({"sku": sku, "category": category, "image": f"{sku}.jpg"})
    write_catalogue(root / "queries.csv", rows)
    return root / "queries.csv"


def test_evaluate_writes_json_and_offline_html(faiss_index: Path, tiny_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the eval extra (matplotlib) is not installed")
    from app.offline.evaluate.job import evaluate_index

    report = evaluate_index(faiss_index, tiny_model, _queries(tmp_path), tmp_path, tmp_path / "out", progress=False)
    assert report["queries"] == 6 and report["queries_failed"] == []
    assert report["retrieval"]["recall@1"] == 1.0 and report["exact"]["recall@1"] == 1.0
    assert report["routing"]["top1_accuracy"] == 1.0
    assert report["ann"]["image_recall@10"] == 1.0  # 18 vectors: HNSW is exact here
    # The ANN figure measures the graphs alone: its search probed every shard, not the router's choice.
    assert report["ann"]["shards_searched_per_query"] == report["ann"]["shards"] == 3
    assert sum(sum(r) for r in report["routing"]["confusion_matrix"]) == 6
    # 6 SKUs in the catalogue, k=10: every answer holds all 6, and the counts say so.
    assert report["routing"]["result_count_distribution"] == {"6": 6}
    assert sum(report["routing"]["shards_chosen_distribution"].values()) == 6
    assert report["routing"]["recall@5_loss_points"] == 0.0 and report["routing"]["policy_reason"]
    assert set(report["latency_ms"]) == {"decode", "embed", "route", "search", "group"}
    assert report["plots"] == {"included": True, "note": None}
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["queries"] == 6
    assert all(len(str(v["mean"]).split(".")[-1]) <= 4 for v in saved["latency_ms"].values())  # rounded
    page = (tmp_path / "out" / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch, not even a namespace URL
    for element in ('id="confusion"', 'id="confusion-colorbar"', 'id="projection"', 'id="projection-legend"'):
        assert element in page, element
    assert 'id="count-0-0"' in page  # 3 categories: every count fits its cell
    assert ">juice</text>" in page  # labels are text, not paths
    assert "plots-missing" not in page


def test_report_is_complete_without_matplotlib(
    faiss_index: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.offline.evaluate.job import evaluate_index

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    report = evaluate_index(faiss_index, tiny_model, _queries(tmp_path), tmp_path, tmp_path / "out", progress=False)
    assert report["plots"]["included"] is False and "pip install" in report["plots"]["note"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["plots"]["included"] is False
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.rstrip().endswith("</html>") and "<svg" not in page
    assert 'id="plots-missing"' in page and "pip install -e &#x27;.[eval]&#x27;" in page
    for table in ("SKU recall", "Latency per stage", "Router per category", "Open-set threshold"):
        assert f'aria-label="{table}"' in page, table


def test_vps_evaluate_without_matplotlib_exits_0_with_one_line_about_plots(
    faiss_index: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The serving install's `vps evaluate`: once it wrote report.json and crashed on `import matplotlib`."""
    args = ["evaluate", "--index", str(faiss_index), "--queries", str(_queries(tmp_path)), "--images-root",
            str(tmp_path), "--out", str(tmp_path / "out"), "--model", str(tiny_model)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", _NO_MATPLOTLIB, *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "\r" not in done.stderr + done.stdout
    warnings = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [w["msg"].split(":")[0] for w in warnings] == ["plots left out"], done.stderr
    assert "pip install" in warnings[0]["msg"]
    assert "report.html" in done.stdout
    assert json.loads((tmp_path / "out" / "report.json").read_text())["queries"] == 6
    assert 'id="plots-missing"' in (tmp_path / "out" / "report.html").read_text()


def test_duplicate_photos_do_not_look_like_ann_misses(tiny_model: Path, tmp_path: Path) -> None:
    """Four copies of every photo: their scores tie, and counting the exact top-10 by row id made an exact HNSW
    search look like 0.8 recall. By score, ties count: 1.0."""
    from app.offline.evaluate.job import evaluate_index

    catalogue = make_catalogue(tmp_path / "cat", per_sku=2)
    with catalogue.open() as fh:
        rows = list(csv.DictReader(fh))
    write_catalogue(catalogue, [r for r in rows for _ in range(4)])
    build_index(catalogue, catalogue.parent, tmp_path / "index", tiny_model, BuildOptions(progress=False))
    report = evaluate_index(
        tmp_path / "index", tiny_model, _queries(tmp_path), tmp_path, tmp_path / "out", progress=False
    )
    assert report["ann"]["image_recall@10"] == 1.0
    assert report["exhaustive"] == report["exact"]
