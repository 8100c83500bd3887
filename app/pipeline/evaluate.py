"""`vps evaluate`: how good is an index? Sends every query photo through the same engine the service uses and
writes report.json and a self-contained report.html (plots embedded as PNG, no network).

Measured: SKU recall@1/5/10, precision@k and mAP@10 (one row per SKU, so one relevant row per query); router
top-1/top-3 accuracy, confusion matrix and per-category precision/recall/F1/support with micro, macro and
weighted averages; ANN recall@10 of the HNSW shards against exact search; routed against exhaustive recall;
latency per stage; a 2-D projection of the catalogue; the open-set threshold's precision-recall curve."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from app.config import Settings
from app.index.loader import load_engine
from app.pipeline.catalogue import read_catalogue
from app.pipeline.evaluation import (
    classification_report,
    confusion_matrix,
    map_at_k,
    overlap_at_k,
    pr_curve,
    precision_at_k,
    recall_at_k,
    top_skus,
)
from app.search import STAGES, SearchParams

KS = (1, 5, 10)


def evaluate_index(
    index_dir: Path, model_dir: Path, queries_csv: Path, images_root: Path, out_dir: Path, *, progress: bool = True
) -> dict[str, Any]:
    engine = load_engine(Settings(index_dir=index_dir, model_dir=model_dir, warmup_queries=0))
    manifest = engine.manifest
    names = engine.categories
    cat_index = {n: i for i, n in enumerate(names)}
    rows, problems = read_catalogue(queries_csv)
    rows = [r for r in rows if r.category in cat_index or not r.category]

    vectors = np.vstack([s.index.vectors() for s in engine.shards]).astype(np.float32)
    item_skus = np.asarray([engine.items.get(i)["sku"] for i in range(len(vectors))])
    item_cats = np.concatenate([np.full(s.index.ntotal, i) for i, s in enumerate(engine.shards)])

    routed_rank, exhaustive_rank, exact_rank, truth = [], [], [], []
    ann_ids, exact_ids = [], []
    router_true, router_pred, router_top3 = [], [], []
    top_scores, top_correct, top_category = [], [], []
    shards_probed: list[int] = []
    shards_added: list[int] = []
    result_counts: list[int] = []
    timings: dict[str, list[float]] = {s: [] for s in STAGES}
    failed: list[dict[str, str]] = [{"image": p.image, "reason": p.reason} for p in problems]
    routed_params = SearchParams(k=10, probe_mass=manifest.probe_mass, max_probes=manifest.max_probes, min_score=-1)
    all_params = SearchParams(k=10, probe_mass=1.0, max_probes=len(names), min_score=-1, explain=True)

    t_start = time.perf_counter()
    for row in tqdm(rows, desc="evaluating", unit="query", disable=not progress):
        try:
            vector, stage_t = engine.embed_image((images_root / row.image).read_bytes())
        except Exception as exc:  # a bad query photo is reported, not fatal
            failed.append({"image": row.image, "reason": type(exc).__name__})
            continue
        routed = engine.search_vector(vector, routed_params)
        for stage, seconds in {**stage_t, **routed.timings_s}.items():
            timings[stage].append(seconds * 1000)
        exhaustive = engine.search_vector(vector, all_params)
        sims = vectors @ vector
        truth.append(row.sku)
        routed_rank.append([str(h.item["sku"]) for h in routed.results])
        exhaustive_rank.append([str(h.item["sku"]) for h in exhaustive.results])
        exact_rank.append(top_skus(sims, item_skus, 10))
        ann_ids.append(np.asarray([h.row for h in exhaustive.image_hits[:10]]))
        exact_ids.append(np.argsort(-sims, kind="stable")[:10])
        shards_probed.append(len(routed.probes))
        shards_added.append(len(routed.added))
        result_counts.append(len(routed.results))
        probs = engine.router.probabilities(vector)
        order = np.argsort(-probs)
        if row.category:
            router_true.append(cat_index[row.category])
            router_pred.append(int(order[0]))
            router_top3.append(cat_index[row.category] in order[:3].tolist())
        if routed.results:
            top = routed.results[0]
            top_scores.append(top.score)
            top_correct.append(str(top.item["sku"]) == row.sku)
            top_category.append(str(top.item["category"]))
    elapsed = time.perf_counter() - t_start

    matrix = confusion_matrix(router_true, router_pred, len(names))
    scores_arr, correct_arr = np.asarray(top_scores), np.asarray(top_correct, dtype=bool)
    thresholds = np.asarray([manifest.threshold(c) for c in top_category])
    accepted = scores_arr >= thresholds if len(thresholds) else np.zeros(0, dtype=bool)
    n = len(truth)
    report: dict[str, Any] = {
        "index_version": manifest.version,
        "model": manifest.model.model_dump(),
        "queries": n,
        "queries_failed": failed,
        "seconds": round(elapsed, 1),
        "retrieval": {
            **{f"recall@{k}": recall_at_k(routed_rank, truth, k) for k in KS},
            **{f"precision@{k}": precision_at_k(routed_rank, truth, k) for k in KS},
            "map@10": map_at_k(routed_rank, truth, 10),
        },
        "exhaustive": {f"recall@{k}": recall_at_k(exhaustive_rank, truth, k) for k in KS},
        "exact": {f"recall@{k}": recall_at_k(exact_rank, truth, k) for k in KS},
        "routing": {
            "top1_accuracy": float(np.mean(np.asarray(router_pred) == np.asarray(router_true)))
            if router_true
            else None,
            "top3_accuracy": float(np.mean(router_top3)) if router_top3 else None,
            "mean_shards_probed": float(np.mean(shards_probed)) if shards_probed else 0.0,
            "probe_mass": manifest.probe_mass,
            "max_probes": manifest.max_probes,
            "mean_shards_added": float(np.mean(shards_added)) if shards_added else 0.0,
            "shards_chosen_distribution": _distribution(shards_probed),
            "shards_added_distribution": _distribution(shards_added),
            "result_count_distribution": _distribution(result_counts),
            "policy_reason": manifest.router_report.get("policy_reason"),
            **{
                f"recall@{k}_loss_points": 100
                * (recall_at_k(exhaustive_rank, truth, k) - recall_at_k(routed_rank, truth, k))
                for k in KS
            },
            "categories": names,
            "confusion_matrix": matrix.tolist(),
            "per_category": classification_report(matrix, names),
        },
        "ann_recall@10": overlap_at_k(ann_ids, exact_ids, 10),
        "latency_ms": {
            stage: {"mean": float(np.mean(v)), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
            for stage, v in timings.items()
            if v
        },
        "open_set": {
            "target_precision": manifest.router_report.get("target_precision"),
            "answered_fraction": float(accepted.mean()) if len(accepted) else 0.0,
            "precision_when_answered": float(correct_arr[accepted].mean()) if accepted.any() else None,
            "pr_curve": pr_curve(scores_arr, correct_arr),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    from app.pipeline.report_html import write_html

    write_html(report, vectors, item_cats, names, out_dir / "report.html")
    return report


def _distribution(values: list[int]) -> dict[str, int]:
    """How many queries had each value (as a JSON object: value -> queries)."""
    counts = np.bincount(np.asarray(values, dtype=np.int64)) if values else np.zeros(0, dtype=np.int64)
    return {str(v): int(c) for v, c in enumerate(counts) if c}
