"""The evaluation report as one self-contained HTML file: tables plus PNG plots embedded as data URIs."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import numpy as np

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 70rem; }
table { border-collapse: collapse; margin: 1rem 0; }
td, th { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
"""


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict[str, Any], vectors: np.ndarray, item_cats: np.ndarray, names: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    matrix = np.asarray(report["routing"]["confusion_matrix"], dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    size = max(5.0, 0.22 * len(names))
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), names, fontsize=6)
    ax.set_xlabel("router top-1")
    ax.set_ylabel("true category")
    ax.set_title("Router confusion matrix (row-normalised)")
    out["confusion"] = _png(fig)
    plt.close(fig)

    rng = np.random.default_rng(0)
    idx = rng.choice(len(vectors), size=min(5000, len(vectors)), replace=False)
    x = vectors[idx] - vectors[idx].mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(xy[:, 0], xy[:, 1], c=item_cats[idx], cmap="tab20", s=6)
    ax.set_title("Catalogue embeddings, first two principal components, coloured by category")
    out["projection"] = _png(fig)
    plt.close(fig)

    pr = report["open_set"]["pr_curve"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(pr["recall"], pr["precision"], marker=".", ms=3)
    ax.set_xlabel("recall (correct answers given / all correct answers)")
    ax.set_ylabel("precision (correct / answered)")
    ax.set_title("Top-1 score threshold: precision vs recall")
    ax.set_ylim(0, 1.02)
    out["pr"] = _png(fig)
    plt.close(fig)
    return out


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_html(
    report: dict[str, Any], vectors: np.ndarray, item_cats: np.ndarray, names: list[str], path: Path
) -> None:
    plots = _plots(report, vectors, item_cats, names)
    r = report["retrieval"]
    summary = _table(
        ["metric", "routed (served)", "exhaustive HNSW", "exact"],
        [
            [f"recall@{k}", r[f"recall@{k}"], report["exhaustive"][f"recall@{k}"], report["exact"][f"recall@{k}"]]
            for k in (1, 5, 10)
        ],
    )
    other = _table(
        ["metric", "value"],
        [
            ["precision@1 / @5 / @10", f"{r['precision@1']:.4f} / {r['precision@5']:.4f} / {r['precision@10']:.4f}"],
            ["mAP@10", r["map@10"]],
            ["router top-1 accuracy", report["routing"]["top1_accuracy"]],
            ["router top-3 accuracy", report["routing"]["top3_accuracy"]],
            ["shards the router chose per query", report["routing"]["mean_shards_probed"]],
            ["shards added to fill k per query", report["routing"]["mean_shards_added"]],
            ["answers by number of results (k=10)", _counts(report["routing"]["result_count_distribution"])],
            [
                "routing cost, recall@1 / @5 / @10 points",
                " / ".join(f"{report['routing'][f'recall@{k}_loss_points']:.2f}" for k in (1, 5, 10)),
            ],
            ["probing policy (build)", report["routing"].get("policy_reason") or ""],
            ["ANN recall@10 vs exact", report["ann_recall@10"]],
            ["open set: answered fraction", report["open_set"]["answered_fraction"]],
            ["open set: precision when answered", report["open_set"]["precision_when_answered"]],
        ],
    )
    latency = _table(
        ["stage", "mean ms", "p50 ms", "p95 ms"],
        [[s, v["mean"], v["p50"], v["p95"]] for s, v in report["latency_ms"].items()],
    )
    per_cat = report["routing"]["per_category"]
    categories = _table(
        ["category", "precision", "recall", "F1", "support"],
        [[name, v["precision"], v["recall"], v["f1"], v["support"]] for name, v in per_cat.items()],
    )
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Index evaluation {html.escape(report["index_version"])}</title>
<style>{_CSS}</style></head><body>
<h1>Index evaluation</h1>
<p>Index <code>{html.escape(report["index_version"])}</code>, model <code>{html.escape(report["model"]["name"])}</code>,
{report["queries"]} queries ({len(report["queries_failed"])} failed), {report["seconds"]} s.</p>
<h2>SKU retrieval</h2>{summary}{other}
<h2>Latency per stage</h2>{latency}
<h2>Router</h2><img alt="router confusion matrix" src="{plots["confusion"]}">
<h3>Per category (router top-1)</h3>{categories}
<h2>Embeddings</h2><img alt="2-D projection of catalogue embeddings" src="{plots["projection"]}">
<h2>Open-set threshold</h2><img alt="precision-recall curve of the top-1 score threshold" src="{plots["pr"]}">
</body></html>
"""
    path.write_text(doc)


def _counts(distribution: dict[str, int]) -> str:
    return ", ".join(f"{n} results: {q}" for n, q in sorted(distribution.items(), key=lambda kv: int(kv[0])))
