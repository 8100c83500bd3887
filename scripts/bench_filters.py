"""Filtered search on a million synthetic vectors: latency and exactness at selectivities 100 %, 10 %, 1 %, 0.1 %.

    python scripts/bench_filters.py [--n 1000000] [--dim 128] [--queries 200]

The engine is the service's own (`SearchEngine.search_vector` in process, one thread, k=10): per-category faiss HNSW
shards (M=32, efConstruction=200 as the build; efSearch 64), the item table and the attribute columns a build writes
(`ItemTable.write`, `AttributeIndex.write`), and a centroid router (cosine to each category's mean, softmax) in
place of a fitted one, which this benchmark does not measure. Every SKU (5 images) carries attributes whose values
make the filters keep the wanted share of the catalogue, spread over every category.

For each filter, every query is searched (a) filtered and (b) unfiltered with the non-matching results dropped
afterwards ("post-filter", what a plain HNSW search with a filter does). Recall@10 (SKUs) is against an exact
search over the matching items of the shards the filtered search probed (routing and filling left out: this is
the filter's exactness), and also against an exact search over every matching item (routing included). Variants
take turns query by query. Writes docs/bench/bench_filters.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.artifacts.attributes import AttributeIndex
from app.artifacts.items import ItemTable
from app.artifacts.manifest import Manifest
from app.artifacts.shards import FaissHnswShard
from app.engine.search import SearchEngine, SearchParams, Shard

PER_SKU = 5
FILTERS = {  # share of the catalogue kept -> filter
    1.0: "all=yes",
    0.1: "s10=0",
    0.01: "s100=0",
    0.001: "s1000=0",
}
DATA_VERSION = 1


class CentroidRouter:
    def __init__(self, centroids: np.ndarray, names: list[str], temperature: float = 30.0) -> None:
        self._c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        self._names = names
        self._t = temperature

    @property
    def categories(self) -> list[str]:
        return self._names

    @property
    def dim(self) -> int:
        return int(self._c.shape[1])

    def probabilities(self, query: np.ndarray) -> np.ndarray:
        z = self._t * (self._c @ query.reshape(-1))
        e = np.exp(z - z.max())
        out: np.ndarray = e / e.sum()
        return out


def synthetic(n: int, dim: int, n_cat: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectors sorted by category (so a global row is its index), each SKU's category, each row's SKU, and the
    categories' sizes (Zipf-like)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_cat + 1) ** 0.8
    n_sku = n // PER_SKU
    sku_cat = np.sort(rng.choice(n_cat, size=n_sku, p=weights / weights.sum()))
    cat_centres = rng.standard_normal((n_cat, dim)).astype(np.float32)
    sku_centres = cat_centres[sku_cat] + 0.6 * rng.standard_normal((n_sku, dim)).astype(np.float32)
    x = np.repeat(sku_centres, PER_SKU, axis=0)
    x += 0.45 * rng.standard_normal(x.shape).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sizes = np.bincount(sku_cat, minlength=n_cat) * PER_SKU
    return x, sku_cat, np.arange(n) // PER_SKU, sizes


def build(x: np.ndarray, sku_cat: np.ndarray, sizes: np.ndarray, work: Path, seed: int) -> None:
    marker = work / "built.json"
    if marker.exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    offset = 0
    for c, size in enumerate(sizes):
        if size:
            FaissHnswShard.build(x[offset : offset + size], work / f"{c:04d}.faiss", M=32, ef_construction=200)
        offset += int(size)
    rng = np.random.default_rng(seed + 1)
    n_sku = len(sku_cat)
    draws = {key: rng.integers(0, m, size=n_sku) for key, m in (("s10", 10), ("s100", 100), ("s1000", 1000))}
    attrs = []
    rows = []
    for s in range(n_sku):
        a = {"all": "yes", **{k: str(int(v[s])) for k, v in draws.items()}}
        for _ in range(PER_SKU):
            attrs.append(a)
            rows.append({"sku": f"sku-{s:07d}", "category": f"cat-{sku_cat[s]:03d}", "image": "", "attributes": a})
    ItemTable.write(rows, work / "items.jsonl", work / "items.offsets.npy")
    AttributeIndex.write(attrs, work)
    marker.write_text(json.dumps({"build_s": round(time.perf_counter() - t0, 1)}))


def engine(x: np.ndarray, sizes: np.ndarray, work: Path, ef_search: int) -> SearchEngine:
    shards, names, centroids, offset = [], [], [], 0
    for c, size in enumerate(sizes):
        if not size:
            continue
        index = FaissHnswShard.load(work / f"{c:04d}.faiss", ef_search=ef_search)
        shards.append(Shard(f"cat-{c:03d}", offset, index, n_skus=int(size) // PER_SKU))
        names.append(f"cat-{c:03d}")
        centroids.append(x[offset : offset + size].mean(axis=0))
        offset += int(size)
    listed = {str(p.relative_to(work)) for p in (work / "attributes").iterdir()} | {"attributes/columns.json"}
    items = ItemTable.load(work / "items.jsonl", work / "items.offsets.npy")
    return SearchEngine(
        embedder=None,  # type: ignore[arg-type]  # search_vector never embeds
        router=CentroidRouter(np.stack(centroids), names),
        shards=shards,
        items=items,
        manifest=Manifest.model_construct(thresholds={}, global_threshold=-1.0),
        max_image_pixels=1,
        overfetch=4,
        attributes=AttributeIndex.load(work, "attributes/columns.json", len(x), listed),
        ef_search=ef_search,
    )


def exact_skus(x: np.ndarray, row_sku: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int) -> list[int]:
    if len(rows) == 0:
        return []
    scores = x[rows] @ q
    top = rows[np.argsort(-scores, kind="stable")[: k * PER_SKU * 4]]
    out: list[int] = []
    for r in top:
        s = int(row_sku[r])
        if s not in out:
            out.append(s)
            if len(out) == k:
                break
    return out


def recall(got: list[int], want: list[int]) -> float:
    return len(set(got) & set(want)) / len(want) if want else 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--categories", type=int, default=100)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ef-search", type=int, default=64, help="the shards' efSearch (the build's default: 64)")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-filters")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    seed = 11
    x, sku_cat, row_sku, sizes = synthetic(args.n, args.dim, args.categories, seed)
    work = args.work / f"n{args.n}-d{args.dim}-c{args.categories}-v{DATA_VERSION}"
    build(x, sku_cat, sizes, work, seed)
    faiss.omp_set_num_threads(1)
    eng = engine(x, sizes, work, args.ef_search)
    rng = np.random.default_rng(seed + 2)
    picks = rng.choice(args.n, size=args.queries, replace=False)
    queries = x[picks] + 0.05 * rng.standard_normal((args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    base = SearchParams(k=10, probe_mass=0.9, max_probes=3)
    for q in queries[:20]:  # warm-up: page in the shards the queries visit
        eng.search_vector(q, base)

    compile_s = {}
    for share, text in FILTERS.items():
        t0 = time.perf_counter()
        eng.compile_filter(text)
        compile_s[str(share)] = round(time.perf_counter() - t0, 4)
    rows_out = []
    for share, text in [(None, None), *FILTERS.items()]:
        params = SearchParams(k=10, probe_mass=0.9, max_probes=3, filter=text)
        mask = eng.compile_filter(text).mask if text else np.ones(args.n, dtype=bool)
        lat_f, lat_post, r_probed, r_all, r_post, shards, found = [], [], [], [], [], [], []
        for i, q in enumerate(queries):
            order = ["filtered", "post"] if i % 2 == 0 else ["post", "filtered"]
            for variant in order:
                t0 = time.perf_counter()
                out = eng.search_vector(q, params if variant == "filtered" else base)
                dt = time.perf_counter() - t0
                if variant == "filtered":
                    lat_f.append(dt)
                    filtered = out
                else:
                    lat_post.append(dt)
                    post = [int(row_sku[h.row]) for h in out.results if mask[h.row]]
            searched = [p.category for p in filtered.probes + filtered.added]
            in_probed = np.concatenate(
                [np.arange(eng.shards[c].offset, eng.shards[c].offset + eng.shards[c].index.ntotal) for c in searched]
            )
            in_probed = in_probed[mask[in_probed]]
            got = [int(row_sku[h.row]) for h in filtered.results]
            want_probed = exact_skus(x, row_sku, in_probed, q, 10)
            want_all = exact_skus(x, row_sku, np.flatnonzero(mask), q, 10)
            r_probed.append(recall(got, want_probed))
            r_all.append(recall(got, want_all))
            r_post.append(recall(post, want_probed))
            shards.append(len(searched))
            found.append(len(got))
        row = {
            "filter": text or "(none)",
            "share": share if share is not None else 1.0,
            "matching_rows": int(mask.sum()),
            "p50_ms": round(float(np.percentile(lat_f, 50)) * 1000, 3),
            "p99_ms": round(float(np.percentile(lat_f, 99)) * 1000, 3),
            "unfiltered_p50_ms": round(float(np.percentile(lat_post, 50)) * 1000, 3),
            "p50_vs_unfiltered": round(float(np.percentile(lat_f, 50) / np.percentile(lat_post, 50)), 3),
            "recall10_vs_exact_probed": round(float(np.mean(r_probed)), 4),
            "recall10_vs_exact_all": round(float(np.mean(r_all)), 4),
            "post_filter_recall10": round(float(np.mean(r_post)), 4),
            "shards_searched_mean": round(float(np.mean(shards)), 2),
            "results_mean": round(float(np.mean(found)), 2),
        }
        rows_out.append(row)
        print(json.dumps(row), flush=True)
    doc = {
        "command": " ".join(["python scripts/bench_filters.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "faiss": faiss.__version__,
            "git_commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "load_average_1m_start": round(os.getloadavg()[0], 2),
        },
        "n": args.n,
        "dim": args.dim,
        "categories": args.categories,
        "category_sizes": {"min": int(sizes[sizes > 0].min()), "max": int(sizes.max())},
        "queries": args.queries,
        "ef_search": args.ef_search,
        "build": json.loads((work / "built.json").read_text()),
        "compile_s_first_time": compile_s,
        "rows": rows_out,
        "run_s": round(time.perf_counter() - t_start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_filters-{args.tag}" if args.tag else "bench_filters"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(doc))
    sys.stdout.write(markdown(doc))


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Filtered search: latency and exactness by selectivity",
        "",
        f"`{doc['command']}` — {m['cpus']} CPUs (shared), Python {m['python']}, faiss {m['faiss']}, commit "
        f"{m['git_commit']}, load average {m['load_average_1m_start']} at the start; run {doc['run_s']:.0f} s.",
        "",
        f"{doc['n']:,} synthetic {doc['dim']}-d vectors, 5 a SKU, in {doc['categories']} categories of "
        f"{doc['category_sizes']['min']:,}-{doc['category_sizes']['max']:,} vectors (per-category faiss HNSW, "
        f"M=32, efConstruction=200 as the build, efSearch {doc['ef_search']}); `search_vector` in process, "
        f"one thread, k=10, probe_mass 0.9, max_probes 3, filling to k; {doc['queries']} queries. "
        "Recall@10 of SKUs: against an exact search over the matching items of the shards searched (the "
        "filter's exactness) and over every matching item (routing included); post-filter: the unfiltered "
        "search with non-matching results dropped.",
        "",
        "| filter | share kept | matching rows | p50 ms | p99 ms | unfiltered p50 ms | p50 vs unfiltered | "
        "recall@10 vs exact (searched shards) | recall@10 vs exact (all) | post-filter recall@10 | shards searched | "
        "results |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| `{r['filter']}` | {r['share']:.1%} | {r['matching_rows']:,} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['unfiltered_p50_ms']} | {r['p50_vs_unfiltered']} | {r['recall10_vs_exact_probed']} | "
            f"{r['recall10_vs_exact_all']} | {r['post_filter_recall10']} | {r['shards_searched_mean']} | "
            f"{r['results_mean']} |"
        )
    c = doc["compile_s_first_time"]
    lines += [
        "",
        "Compiling a filter the first time (parse, then a mask over every row from the memory-mapped columns; "
        "later searches with the same text find it cached): "
        + ", ".join(f"{float(k):.1%}: {v * 1000:.1f} ms" for k, v in c.items())
        + f". Build: {doc['build']['build_s']} s (shards, item table, attribute columns).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
