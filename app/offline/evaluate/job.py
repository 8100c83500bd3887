"""`vps evaluate`: how good is an index? Sends every query photo through the same engine the service uses and
writes report.json and a self-contained report.html (plots as inline SVG, no network).

Measured: SKU recall@1/5/10, precision@k and mAP@10 (one row per SKU, so one relevant row per query); router
top-1/top-3 accuracy, confusion matrix and per-category precision/recall/F1/support with micro, macro and
weighted averages; HNSW image recall@10 (every shard searched, against brute force over the same vectors: the
graphs' own loss, routing plays no part); routed against exhaustive recall; latency per stage; a 2-D projection of
the catalogue; the open-set threshold's precision-recall curve. Without matplotlib the HTML report has every
table and says how to get the plots. Figures in report.json are rounded to 4 decimals."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from app.artifacts.manifest import Manifest
from app.engine.assemble import open_index
from app.engine.search import STAGES, SearchEngine, every_shard, resolve_params
from app.offline.datasets.catalogue import read_catalogue
from app.offline.evaluate.metrics import (
    ann_recall,
    classification_report,
    confusion_matrix,
    map_at_k,
    pr_curve,
    precision_at_k,
    recall_at_k,
    top_skus,
)
from app.offline.evaluate.report_html import plots_missing, render_html
from app.offline.progress import progress as track

KS = (1, 5, 10)
ANN_K = 10
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Catalogue:
    """Every vector of the index with its SKU and shard, for the exact-search yardstick and the projection."""

    vectors: np.ndarray
    skus: np.ndarray
    shards: np.ndarray


@dataclass(frozen=True)
class _QueryResult:
    """What one query photo gave: routed, every shard and exact rankings, and how it was routed."""

    sku: str
    category: int | None  # the query's true category, when the CSV gives one
    routed: list[str]
    exhaustive: list[str]
    exact: list[str]
    ann_recall: float  # the every-shard HNSW search's top image rows against brute force (metrics.ann_recall)
    exhaustive_shards: int  # shards that search probed: all of them, or the figure would measure routing too
    chosen: int
    added: int
    router_order: np.ndarray
    top: tuple[float, bool, str] | None  # routed top hit: score, right SKU, its category
    timings_ms: dict[str, float]


def evaluate_index(
    index_dir: Path, model_dir: Path, queries_csv: Path, images_root: Path, out_dir: Path, *, progress: bool = True
) -> dict[str, Any]:
    """Every query photo through the served path and the yardsticks, then report.json and report.html."""
    engine = open_index(index_dir, model_dir)
    cat_index = {n: i for i, n in enumerate(engine.categories)}
    rows, problems = read_catalogue(queries_csv)
    rows = [r for r in rows if r.category in cat_index or not r.category]
    failed: list[dict[str, str]] = [{"image": p.image, "reason": p.reason} for p in problems]
    catalogue = _Catalogue(
        vectors=np.vstack([s.index.vectors() for s in engine.shards]).astype(np.float32),
        skus=np.asarray([engine.items.get(i)["sku"] for i in range(engine.manifest.n_items)]),
        shards=np.concatenate([np.full(s.index.ntotal, i) for i, s in enumerate(engine.shards)]),
    )
    t_start = time.perf_counter()
    results: list[_QueryResult] = []
    for row in track(rows, desc="evaluating", unit="query", enabled=progress):
        try:
            vector, stage_t = engine.embed_image((images_root / row.image).read_bytes())
        except Exception as exc:  # a bad query photo is reported, not fatal
            failed.append({"image": row.image, "reason": type(exc).__name__})
            continue
        results.append(_one_query(engine, catalogue, vector, stage_t, row.sku, cat_index.get(row.category)))
    report = _report(engine, results, failed, time.perf_counter() - t_start)
    missing = plots_missing()
    report["plots"] = {"included": missing is None, "note": missing}
    if missing:
        log.warning(missing)
    # Both files are rendered before either is written: a failure never leaves a report.json without its page.
    page = render_html(report, catalogue.vectors, catalogue.shards, engine.categories)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.html").write_text(page)
    return report


def _one_query(
    engine: SearchEngine,
    catalogue: _Catalogue,
    vector: np.ndarray,
    embed_timings_s: dict[str, float],
    sku: str,
    category: int | None,
) -> _QueryResult:
    routed_params = resolve_params(engine.manifest, k=10, min_score=-1)
    routed = engine.search_vector(vector, routed_params)
    exhaustive = engine.search_vector(vector, every_shard(replace(routed_params, explain=True), len(engine.shards)))
    sims = catalogue.vectors @ vector
    top = routed.results[0] if routed.results else None
    return _QueryResult(
        sku=sku,
        category=category,
        routed=[str(h.item["sku"]) for h in routed.results],
        exhaustive=[str(h.item["sku"]) for h in exhaustive.results],
        exact=top_skus(sims, catalogue.skus, 10),
        ann_recall=ann_recall(np.asarray([h.row for h in exhaustive.image_hits[:ANN_K]]), sims, ANN_K),
        exhaustive_shards=len(exhaustive.probes) + len(exhaustive.added),
        chosen=len(routed.probes),
        added=len(routed.added),
        router_order=np.argsort(-engine.router.probabilities(vector)),
        top=(top.score, str(top.item["sku"]) == sku, str(top.item["category"])) if top is not None else None,
        timings_ms={stage: s * 1000 for stage, s in {**embed_timings_s, **routed.timings_s}.items()},
    )


def _report(
    engine: SearchEngine, results: list[_QueryResult], failed: list[dict[str, str]], elapsed: float
) -> dict[str, Any]:
    manifest = engine.manifest
    truth = [r.sku for r in results]
    routed = [r.routed for r in results]
    exhaustive = [r.exhaustive for r in results]
    timings = {s: [r.timings_ms[s] for r in results if s in r.timings_ms] for s in STAGES}
    report: dict[str, Any] = _rounded(
        {
            "index_version": manifest.version,
            "model": manifest.model.model_dump(),
            "queries": len(results),
            "queries_failed": failed,
            "seconds": round(elapsed, 1),
            "retrieval": {
                **{f"recall@{k}": recall_at_k(routed, truth, k) for k in KS},
                **{f"precision@{k}": precision_at_k(routed, truth, k) for k in KS},
                "map@10": map_at_k(routed, truth, 10),
            },
            "exhaustive": {f"recall@{k}": recall_at_k(exhaustive, truth, k) for k in KS},
            "exact": {f"recall@{k}": recall_at_k([r.exact for r in results], truth, k) for k in KS},
            "routing": _routing(engine, results, truth, routed, exhaustive),
            "ann": {
                f"image_recall@{ANN_K}": float(np.mean([r.ann_recall for r in results])) if results else None,
                "shards_searched_per_query": float(np.mean([r.exhaustive_shards for r in results])) if results else 0.0,
                "shards": len(engine.shards),
                "measures": f"HNSW search of every shard against brute force over the same vectors: the share of the "
                f"{ANN_K} nearest catalogue images (by score, ties counted) the graphs return; routing plays no part",
            },
            "latency_ms": {
                stage: {
                    "mean": float(np.mean(v)),
                    "p50": float(np.percentile(v, 50)),
                    "p95": float(np.percentile(v, 95)),
                }
                for stage, v in timings.items()
                if v
            },
            "open_set": _open_set(manifest, [r.top for r in results if r.top is not None]),
        }
    )
    return report


def _routing(
    engine: SearchEngine,
    results: list[_QueryResult],
    truth: list[str],
    routed: list[list[str]],
    exhaustive: list[list[str]],
) -> dict[str, Any]:
    names, manifest = engine.categories, engine.manifest
    labelled = [r for r in results if r.category is not None]
    router_true = [int(r.category) for r in labelled if r.category is not None]
    router_pred = [int(r.router_order[0]) for r in labelled]
    router_top3 = [r.category in r.router_order[:3].tolist() for r in labelled]
    matrix = confusion_matrix(router_true, router_pred, len(names))
    chosen, added = [r.chosen for r in results], [r.added for r in results]
    return {
        "top1_accuracy": float(np.mean(np.asarray(router_pred) == np.asarray(router_true))) if router_true else None,
        "top3_accuracy": float(np.mean(router_top3)) if router_top3 else None,
        "mean_shards_probed": float(np.mean(chosen)) if chosen else 0.0,
        "probe_mass": manifest.probe_mass,
        "max_probes": manifest.max_probes,
        "mean_shards_added": float(np.mean(added)) if added else 0.0,
        "shards_chosen_distribution": _distribution(chosen),
        "shards_added_distribution": _distribution(added),
        "result_count_distribution": _distribution([len(r) for r in routed]),
        "policy_reason": manifest.router_report.get("policy_reason"),
        **{
            f"recall@{k}_loss_points": 100 * (recall_at_k(exhaustive, truth, k) - recall_at_k(routed, truth, k))
            for k in KS
        },
        "categories": names,
        "confusion_matrix": matrix.tolist(),
        "per_category": classification_report(matrix, names),
    }


def _open_set(manifest: Manifest, tops: list[tuple[float, bool, str]]) -> dict[str, Any]:
    """How the manifest's thresholds would have answered: the routed top hits' scores against them."""
    scores = np.asarray([t[0] for t in tops])
    correct = np.asarray([t[1] for t in tops], dtype=bool)
    thresholds = np.asarray([manifest.threshold(t[2]) for t in tops])
    accepted = scores >= thresholds if len(thresholds) else np.zeros(0, dtype=bool)
    return {
        "target_precision": manifest.router_report.get("target_precision"),
        "answered_fraction": float(accepted.mean()) if len(accepted) else 0.0,
        "precision_when_answered": float(correct[accepted].mean()) if accepted.any() else None,
        "pr_curve": pr_curve(scores, correct),
    }


def _distribution(values: list[int]) -> dict[str, int]:
    """How many queries had each value (as a JSON object: value -> queries)."""
    counts = np.bincount(np.asarray(values, dtype=np.int64)) if values else np.zeros(0, dtype=np.int64)
    return {str(v): int(c) for v, c in enumerate(counts) if c}


def _rounded(value: Any) -> Any:
    """Every float of the report to 4 decimals (a rate to 0.01 %, a time to 0.1 us): figures a person can read."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
