"""The evaluation report as one self-contained HTML file: every figure in tables, and plots when matplotlib is
installed (the `eval` extra; the serving install has none, and the page then says how to get them). Plots are
inline SVG with their text kept as text (legend, colour bar and counts are elements of the page), the scatter
points rasterised inside them. Nothing is fetched when the page opens.

Rounding, the same everywhere: rates (recall, precision, accuracy, shares) 3 decimals, percentage points 1,
milliseconds and means of counts 2."""

from __future__ import annotations

import html
import io
import re
from typing import Any

import numpy as np

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 72rem; color: #1b1f24; }
table { border-collapse: collapse; margin: 1rem 0; font-variant-numeric: tabular-nums; }
td, th { border: 1px solid #ccc; padding: .25rem .6rem; text-align: left; }
td.num, th:not(:first-child) { text-align: right; }
svg { max-width: 100%; height: auto; display: block; margin: 1rem 0; }
.note { background: #fff8e1; border: 1px solid #f0d98c; padding: .6rem .8rem; border-radius: 6px; }
.explain { color: #4a535c; max-width: 60rem; }
"""
# Up to 20 categories a colour each (dark hues, then light: neighbours differ), then the colours again with
# another marker: 120 categories stay apart in the legend.
_MARKERS = ("o", "s", "^", "D", "v", "P")
_NUMERIC = re.compile(r"^(n/a|[-0-9. /]+)$")  # right-aligned: figures, "a / b / c" and n/a
_NO_PLOTS_HOW = "pip install -e '.[eval]' in a checkout (or pip install 'matplotlib>=3.8'), then run vps evaluate again"


def plots_missing() -> str | None:
    """None when the plots can be drawn; otherwise the one line that says why not and how to get them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "plots left out: matplotlib is not installed (the serving install does not need it); every figure is "
            f"in the report's tables. For the plots: {_NO_PLOTS_HOW}"
        )
    return None


def rate(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _ms(v: float) -> str:
    return f"{v:.2f}"


def _table(headers: list[str], rows: list[list[Any]], label: str) -> str:
    def cell(v: Any) -> str:
        text = rate(v) if isinstance(v, float) else str(v)  # a float in a table is a rate
        numeric = isinstance(v, int | float) or _NUMERIC.match(text)
        return f'<td class="num">{html.escape(text)}</td>' if numeric else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f'<table aria-label="{html.escape(label)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_html(report: dict[str, Any], vectors: np.ndarray, item_cats: np.ndarray, names: list[str]) -> str:
    """The page: report["plots"]["included"] says whether to draw the plots (vps evaluate sets it)."""
    plots = _plots(report, vectors, item_cats, names) if report["plots"]["included"] else None
    missing = (
        f'<p class="note" id="plots-missing">Plots left out: matplotlib is not installed. Every figure is in the '
        f"tables below; for the plots, {html.escape(_NO_PLOTS_HOW)}.</p>"
    )
    version = html.escape(report["index_version"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Index evaluation {version}</title>
<style>{_CSS}</style></head><body>
<h1>Index evaluation</h1>
<p>Index <code>{version}</code>, model <code>{html.escape(report["model"]["name"])}</code>,
{report["queries"]} queries ({len(report["queries_failed"])} failed), {report["seconds"]:.1f} s.</p>
{"" if plots is not None else missing}
<h2>SKU retrieval</h2>{_retrieval(report)}
<h2>Latency per stage</h2>{_latency(report)}
<h2>Router</h2>{plots["confusion"] if plots else ""}
<h3>Per category (router top-1)</h3>{_per_category(report)}
<h2>Embeddings</h2>{plots["projection"] if plots else ""}
<h2>Open-set threshold</h2>{_open_set(report)}{plots["pr"] if plots else ""}
</body></html>
"""


def _retrieval(report: dict[str, Any]) -> str:
    r, routing, ann = report["retrieval"], report["routing"], report["ann"]
    summary = _table(
        ["metric", "routed (served)", "every shard (HNSW)", "exact (brute force)"],
        [
            [f"recall@{k}", r[f"recall@{k}"], report["exhaustive"][f"recall@{k}"], report["exact"][f"recall@{k}"]]
            for k in (1, 5, 10)
        ],
        "SKU recall",
    )
    other = _table(
        ["metric", "value"],
        [
            ["precision@1 / @5 / @10", " / ".join(rate(r[f"precision@{k}"]) for k in (1, 5, 10))],
            ["mAP@10", r["map@10"]],
            ["router top-1 accuracy", routing["top1_accuracy"]],
            ["router top-3 accuracy", routing["top3_accuracy"]],
            ["shards the router chose, per query", f"{routing['mean_shards_probed']:.2f}"],
            ["shards added to fill k, per query", f"{routing['mean_shards_added']:.2f}"],
            ["answers by number of results (k=10)", _counts(routing["result_count_distribution"])],
            [
                "routing cost: recall@1 / @5 / @10 lost, points",
                " / ".join(f"{routing[f'recall@{k}_loss_points']:.1f}" for k in (1, 5, 10)),
            ],
            ["probing policy (build)", routing.get("policy_reason") or ""],
            [
                f"HNSW image recall@10 (every shard: {ann['shards_searched_per_query']:.2f} of {ann['shards']})",
                ann["image_recall@10"],
            ],
        ],
        "Other retrieval figures",
    )
    explain = (
        '<p class="explain">Recall@k: share of queries whose SKU is among the first k answers (one per SKU). '
        "Routed is what the service answers; every shard searches all categories with the same HNSW graphs; exact "
        "is a brute-force scan. Routing cost is routed against every shard, in percentage points. HNSW image "
        "recall@10 is the graphs' own loss: the share of the 10 nearest catalogue images (by score, ties counted) "
        "that the every-shard search returns; routing plays no part, and below 1 a larger ef_search helps.</p>"
    )
    return summary + other + explain


def _latency(report: dict[str, Any]) -> str:
    rows = [[s, _ms(v["mean"]), _ms(v["p50"]), _ms(v["p95"])] for s, v in report["latency_ms"].items()]
    return _table(["stage", "mean ms", "p50 ms", "p95 ms"], rows, "Latency per stage")


def _per_category(report: dict[str, Any]) -> str:
    """n/a, not 0, where a figure is undefined: recall of a category no query belongs to, precision of one the
    router never chose (metrics.classification_report counts both as 0 and leaves them out of the macro mean)."""
    routing = report["routing"]
    predicted = np.asarray(routing["confusion_matrix"], dtype=np.int64).sum(axis=0)
    rows = []
    for i, (name, v) in enumerate(routing["per_category"].items()):
        own = i < len(routing["categories"])  # then the micro, macro and weighted averages
        precision = "n/a" if own and predicted[i] == 0 else rate(v["precision"])
        unsupported = own and v["support"] == 0
        rows.append(
            [name, precision, *(("n/a", "n/a") if unsupported else (rate(v["recall"]), rate(v["f1"]))), v["support"]]
        )
    note = (
        '<p class="explain">n/a: recall and F1 of a category no query belongs to, precision of a category the '
        "router never chose; the macro average leaves out categories without queries.</p>"
    )
    return _table(["category", "precision", "recall", "F1", "support"], rows, "Router per category") + note


def _open_set(report: dict[str, Any]) -> str:
    o = report["open_set"]
    return _table(
        ["metric", "value"],
        [
            ["target precision (build)", o["target_precision"]],
            ["answered fraction", o["answered_fraction"]],
            ["precision when answered", o["precision_when_answered"]],
        ],
        "Open-set threshold",
    )


def _counts(distribution: dict[str, int]) -> str:
    return ", ".join(f"{n} results: {q}" for n, q in sorted(distribution.items(), key=lambda kv: int(kv[0])))


def _plots(report: dict[str, Any], vectors: np.ndarray, item_cats: np.ndarray, names: list[str]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Text as <text> (legend, labels and counts stay text in the page); fixed ids across runs.
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "vps-report"}):
        return {
            "confusion": _confusion(plt, np.asarray(report["routing"]["confusion_matrix"]), names),
            "projection": _projection(plt, vectors, item_cats, names),
            "pr": _pr(plt, report["open_set"]),
        }


def _svg(plt: Any, fig: Any, gid: str, label: str) -> str:
    """The figure as an <svg> element for inline HTML: no XML prolog, doctype, metadata or namespace URLs."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", dpi=150, bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text[text.index("<svg") :], flags=re.S)
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)  # HTML gives inline <svg> its namespaces
    text = _scope_ids(text, gid)
    return text.replace("<svg", f'<svg id="{gid}" role="img" aria-label="{html.escape(label)}"', 1)


def _scope_ids(svg: str, prefix: str) -> str:
    """Matplotlib numbers ids per figure (axes_1, text_2, clip paths): three figures in one page would repeat
    them, and a reference could resolve into another figure. Prefixed, with their references; ours kept."""

    def scoped(name: str) -> str:
        return name if name.startswith((f"{prefix}-", "count-")) else f"{prefix}-{name}"

    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{scoped(m[1])}"', svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{scoped(m[1])}"', svg)
    return re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{scoped(m[1])})", svg)


def _confusion(plt: Any, counts: np.ndarray, names: list[str]) -> str:
    n = len(names)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    side = max(4.5, 0.24 * n + 1.5)
    fig, ax = plt.subplots(figsize=(side + 1.6, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    tick_size = 8 if n <= 20 else 6
    ax.set_xticks(range(n), names, rotation=90, fontsize=tick_size)
    ax.set_yticks(range(n), names, fontsize=tick_size)
    ax.set_xlabel("router top-1 category")
    ax.set_ylabel("true category")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.03)
    bar.set_label("share of the true category's queries")
    bar.ax.set_gid("confusion-colorbar")
    counted = _annotate_counts(fig, ax, counts, share)
    numbers = "numbers: queries" if counted else "counts in the per-category table (cells too small to print them)"
    ax.set_title(f"Router confusion matrix\ncolour: share of each row's queries; {numbers}", fontsize=10)
    return _svg(plt, fig, "confusion", "router confusion matrix with a colour bar")


def _annotate_counts(fig: Any, ax: Any, counts: np.ndarray, share: np.ndarray) -> bool:
    """Each non-zero cell's count where it fits: the font follows the cell (about 0.6 em a digit); none when the
    cells are too small to hold a readable one."""
    ax.apply_aspect()
    box = ax.get_position()
    cell_pt = 72 * min(box.width * fig.get_figwidth(), box.height * fig.get_figheight()) / max(1, len(counts))
    digits = len(str(int(counts.max()))) if counts.size else 1
    size = min(9.0, 0.6 * cell_pt, 0.8 * cell_pt / (0.6 * digits))
    if size < 5:
        return False
    for i, j in zip(*np.nonzero(counts), strict=True):
        colour = "white" if share[i, j] > 0.55 else "#1b1f24"
        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=size, color=colour, gid=f"count-{i}-{j}")
    return True


def _projection(plt: Any, vectors: np.ndarray, item_cats: np.ndarray, names: list[str]) -> str:
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(vectors), size=min(5000, len(vectors)), replace=False))
    x = vectors[idx] - vectors[idx].mean(axis=0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T if len(vt) >= 2 else np.c_[x @ vt[:1].T, np.zeros(len(x))]
    var = s**2 / max(float((s**2).sum()), 1e-12)
    cmap = plt.get_cmap("tab20").colors
    colours = [*cmap[0::2], *cmap[1::2]]
    fig, ax = plt.subplots(figsize=(7.5, 6))
    for c in np.unique(item_cats[idx]):
        pts = item_cats[idx] == c
        style = {"color": colours[c % 20], "marker": _MARKERS[(c // 20) % len(_MARKERS)]}
        ax.scatter(xy[pts, 0], xy[pts, 1], s=14, linewidths=0, label=names[c], rasterized=True, **style)
    ax.set_xlabel(f"first principal component ({100 * var[0]:.0f} % of the variance)")
    ax.set_ylabel(f"second principal component ({100 * (var[1] if len(var) > 1 else 0):.0f} %)")
    ax.set_title(f"Catalogue embeddings ({len(idx)} images), first two principal components", fontsize=10)
    ncol = 1 if len(names) <= 20 else 2 if len(names) <= 48 else 3
    legend = ax.legend(
        title="category", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, fontsize=7, ncol=ncol,
        frameon=False, markerscale=1.3, handletextpad=0.2, columnspacing=0.8,
    )  # fmt: skip
    legend.set_gid("projection-legend")
    return _svg(plt, fig, "projection", "2-D projection of the catalogue embeddings, coloured by category")


def _pr(plt: Any, open_set: dict[str, Any]) -> str:
    pr = open_set["pr_curve"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(pr["recall"], pr["precision"], marker=".", ms=3, label="top-1 score >= t, every t")
    if open_set.get("target_precision") is not None:
        target = open_set["target_precision"]
        ax.axhline(target, ls="--", lw=1, color="#b3261e", label=f"target precision {target:.3f} (build)")
    ax.set_xlabel("recall (correct answers given / all correct answers)")
    ax.set_ylabel("precision (correct / answered)")
    ax.set_title("Top-1 score threshold: precision against recall", fontsize=10)
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8).set_gid("pr-legend")
    return _svg(plt, fig, "pr", "precision-recall curve of the top-1 score threshold")
