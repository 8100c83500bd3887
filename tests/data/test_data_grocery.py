"""Data tests on the shared GroceryStoreDataset, through the HTTP API: an index built from one split with a
committed model, the val photos as queries. Photos inside one split are burst shots, so only cross-split counts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.offline.build.build_index import BuildOptions, build_index
from app.offline.datasets.catalogue import write_catalogue
from app.offline.datasets.grocery import split_rows
from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import live_server

ROOT = Path(__file__).resolve().parents[2]
FROZEN_MODEL = ROOT / "models" / "efficientnet-lite0-imagenet"
DEFAULT_MODEL = ROOT / Settings().model_dir  # whatever the service serves by default
CATEGORY_MODEL = ROOT / "models" / "grocery-lite0-ms512-cat"

pytestmark = pytest.mark.data

# The router is calibrated on real query photos that are neither in the catalogue nor among the val queries:
# the studio images for a shelf-photo catalogue, the shelf photos for the studio catalogue.
CALIBRATION = {"train": "iconic", "iconic": "train"}


def search_quality(
    dataset: Path,
    model: Path,
    catalogue_split: str,
    tmp: Path,
    *,
    exhaustive_too: bool = False,
    calibrate: bool = True,
    ks: tuple[int, ...] = (),
) -> dict[str, float]:
    """Build an index of `catalogue_split` with `model` (with real query photos for the router's calibration,
    or without), serve it, send every val photo over HTTP (and, with `exhaustive_too`, again with every shard
    probed: the routing's own cost). With `ks`, every val photo again at each k: the answer must hold
    min(k, SKUs in the catalogue) distinct SKUs."""
    write_catalogue(tmp / "catalogue.csv", split_rows(dataset, catalogue_split))
    write_catalogue(tmp / "calibration.csv", split_rows(dataset, CALIBRATION[catalogue_split]))
    result = build_index(
        tmp / "catalogue.csv",
        dataset,
        tmp / "index",
        model,
        BuildOptions(progress=False),
        calibration_queries=tmp / "calibration.csv" if calibrate else None,
    )
    assert result.problems == []
    n_skus = sum(c.n_skus for c in result.manifest.categories)
    queries = split_rows(dataset, "val")
    assert len(queries) == 296
    settings = Settings(index_dir=tmp / "index", model_dir=model, pool_threads=2)
    with live_server(create_app(settings)) as base:

        def ask(row: dict[str, str], everything: bool = False, k: int = 5) -> tuple[dict[str, str], Any]:
            data = (dataset / row["image"]).read_bytes()
            # min_score=-1: closed-set recall (every val SKU is in the catalogue), so the open-set thresholds are off.
            params: dict[str, Any] = {"k": k, "min_score": -1}
            if everything:
                params.update(probe_mass=1.0, max_probes=1000)
            r = httpx.post(f"{base}/search", files={"image": ("q.jpg", data, "image/jpeg")}, params=params, timeout=60)
            assert r.status_code == 200, r.text
            return row, r.json()

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, queries))
            everywhere = list(pool.map(lambda row: ask(row, True), queries)) if exhaustive_too else []
            for k in ks:
                for _, b in pool.map(lambda row, k=k: ask(row, k=k), queries):
                    skus = [x["sku"] for x in b["results"]]
                    assert len(skus) == len(set(skus)) == min(k, n_skus), (k, b["routing"])
    n = len(answers)
    assert all(b["results"] for _, b in answers)
    figures = {
        "recall@1": sum(b["results"][0]["sku"] == row["sku"] for row, b in answers) / n,
        "recall@5": sum(row["sku"] in [x["sku"] for x in b["results"]] for row, b in answers) / n,
        "router_top1": sum(b["routing"]["probed"][0]["category"] == row["category"] for row, b in answers) / n,
        "shards_per_query": sum(len(b["routing"]["probed"]) for _, b in answers) / n,
    }
    figures["shards_added_per_query"] = sum(len(b["routing"]["added"]) for _, b in answers) / n
    figures["build_router_top1"] = result.manifest.router_report["router_top1"]
    if everywhere:
        exhaustive1 = sum(b["results"][0]["sku"] == row["sku"] for row, b in everywhere) / n
        exhaustive5 = sum(row["sku"] in [x["sku"] for x in b["results"]] for row, b in everywhere) / n
        figures["exhaustive_recall@1"] = exhaustive1
        figures["routing_loss_points"] = 100 * (exhaustive1 - figures["recall@1"])
        figures["routing_loss5_points"] = 100 * (exhaustive5 - figures["recall@5"])
    return figures


def _report(measured: dict[str, object], label: str, f: dict[str, float]) -> None:
    measured[label] = " ".join(f"{k}={v:.3f}" for k, v in f.items())


def test_frozen_imagenet_model_floor(dataset_dir: Path, tmp_path: Path, measured: dict[str, object]) -> None:
    f = search_quality(dataset_dir, FROZEN_MODEL, "train", tmp_path)
    _report(measured, f"{FROZEN_MODEL.name}, train catalogue", f)
    assert f["recall@1"] >= 0.55
    assert f["recall@5"] >= 0.85


def test_default_model_train_catalogue(dataset_dir: Path, tmp_path: Path, measured: dict[str, object]) -> None:
    f = search_quality(dataset_dir, DEFAULT_MODEL, "train", tmp_path, exhaustive_too=True)
    _report(measured, f"{DEFAULT_MODEL.name}, train catalogue", f)
    # grocery-lite1-ms512-sp208-int8 1.1.0 measured 0.851 / 0.963 here (0.851 / 0.966 by exact search): floors
    # about 3 and 1.3 points (9 and 4 photos) below. Lite0, the default before, measured 0.828 / 0.976.
    assert f["recall@1"] >= 0.82
    assert f["recall@5"] >= 0.95
    assert f["routing_loss_points"] <= 1.0


def test_default_model_studio_catalogue(dataset_dir: Path, tmp_path: Path, measured: dict[str, object]) -> None:
    f = search_quality(dataset_dir, DEFAULT_MODEL, "iconic", tmp_path, exhaustive_too=True)
    _report(measured, f"{DEFAULT_MODEL.name}, studio catalogue", f)
    # Measured 0.693 / 0.916 (1.1.0; the model trained on half the SKUs' studio shots; Lite0: 0.530 / 0.878).
    assert f["recall@1"] >= 0.66
    assert f["recall@5"] >= 0.87


def test_category_aware_model_routes_well(dataset_dir: Path, tmp_path: Path, measured: dict[str, object]) -> None:
    """Issue 4's bar, with the model trained with the category term (`vps train --category-weight 0.5`): the
    router over its embedding is right for >= 90 % of unseen photos, and routing costs <= 1 point of recall@1."""
    f = search_quality(dataset_dir, CATEGORY_MODEL, "train", tmp_path, exhaustive_too=True)
    _report(measured, f"{CATEGORY_MODEL.name}, train catalogue", f)
    assert f["router_top1"] >= 0.90
    assert f["routing_loss_points"] <= 1.0
    assert f["recall@5"] >= 0.95


def test_default_build_without_query_photos_routes_without_losing_products(
    dataset_dir: Path, tmp_path: Path, measured: dict[str, object]
) -> None:
    """Issue 14: the build most users run (train photos, no --calibration-queries). Every answer holds k SKUs;
    the probing policy it measured on held-out groups of its own photos costs <= 0.5 point of recall@1 and @5 on
    photos it never saw; its own router figure stays near what those photos give."""
    f = search_quality(
        dataset_dir, DEFAULT_MODEL, "train", tmp_path, exhaustive_too=True, calibrate=False, ks=(1, 5, 10, 20)
    )
    _report(measured, f"{DEFAULT_MODEL.name}, train catalogue, no calibration queries", f)
    assert f["routing_loss_points"] <= 0.5
    assert f["routing_loss5_points"] <= 0.5
    # Measured 2.87 with the default 1.1.0 (7-bit weights); 1.0.0 measured 2.13 on a VNNI CPU and 3.09 on another
    # CPU, which is why 1.1.0 exists (docs/training.md). Lite0: 2.49, docs/bench/compare_routers.md.
    assert f["shards_per_query"] < 3.0
    # Issue 14's bar: the build's own figure within 3 points of val's. With the default model (1.1.0) the prototype
    # router measured 0.855 on held-out groups and 0.865 on val (1.0.0: 0.875 and 0.872; Lite0: 0.865 and 0.865;
    # the 240 px Lite1 models missed the bar, docs/routing.md).
    assert abs(f["build_router_top1"] - f["router_top1"]) <= 0.03


def test_studio_catalogue_without_query_photos_loses_no_recall(
    dataset_dir: Path, tmp_path: Path, measured: dict[str, object]
) -> None:
    """One studio image per SKU: nothing measures the router, so the build searches every shard."""
    f = search_quality(dataset_dir, DEFAULT_MODEL, "iconic", tmp_path, exhaustive_too=True, calibrate=False)
    _report(measured, f"{DEFAULT_MODEL.name}, studio catalogue, no calibration queries", f)
    assert f["routing_loss_points"] <= 1.0
    assert f["routing_loss5_points"] <= 1.0
