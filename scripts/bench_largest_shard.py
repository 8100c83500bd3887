"""The largest shard of bench_compressed.py's 10M run, alone, at several graph settings (issue 22 item 5).

    python scripts/bench_largest_shard.py --n 1229391 --graph 16:80 32:200 --out docs/bench

Every search of that run probed one shard (router top-1 1.0), and smaller shards recalled better in scratch runs,
so a 10M node's recall@10 is at least its largest shard's; that shard's latency here, with its file cached, is a
lower bound for the node's worst case (the 10M run's p99 was higher: page faults). It builds in an eighth of the time.
A 10M build at the service's build default (M32/efConstruction 200) takes longer than a session on this machine;
this measures what it would give.

Data: one category of bench_compressed.py's `powerlaw` distribution at the largest category's size (5 vectors a
SKU; spectra fitted to grocery-lite0-ms512's real embeddings), generated here with its own seed; queries are fresh
noisy views of random SKUs of it, the truth their exact top-10 over the shard's vectors. Each graph is built with
the faiss-sq8 backend's own code (app/artifacts/shards.py), loaded memory-mapped as the service loads it, searched
one query at a time for --fetch hits (the service's MIN_FETCH), re-scored from the floats (factor 1) or not
(factor 0), top 10. Writes <out>/bench_largest_shard[-tag].json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from bench_compressed import CHUNK, mapped_resident, read_into_cache, write_unit_rows
from bench_search import cached_build, demo, level_spread, measure
from benchlib import write_report

from app.artifacts.shards import FaissHnswSq8Shard, build_shard
from app.engine.search import MIN_FETCH

K = 10


def one_category(n: int, dim: int, n_queries: int, spectra: dict[str, Any], work: Path) -> dict[str, Any]:
    """n vectors of one powerlaw category (cached under `work`), queries and their exact top-K."""
    rng = np.random.default_rng(n)
    spread = level_spread(rng, dim, spectra)
    mean = rng.normal(size=dim).astype(np.float32)
    mean *= spectra["mean_norm"] / np.linalg.norm(mean)
    centre = mean + spread(1, "category")
    n_sku = -(-n // 5)  # the last SKU may have fewer than 5 photos
    sku = centre + spread(n_sku, "sku")
    q_rng = np.random.default_rng(n + 1)  # its own stream: the queries do not depend on whether x was cached
    q = sku[q_rng.integers(0, n_sku, n_queries)] + level_spread(q_rng, dim, spectra)(n_queries, "photo")
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    path = work / f"category-{n}.npy"
    if not path.exists():
        write_unit_rows(path, n, dim, lambda i, m: spread(m, "photo") + sku[np.arange(i, i + m) // 5])
    x = np.load(path, mmap_mode="r")
    flat = faiss.IndexFlatIP(dim)
    for i in range(0, n, CHUNK):
        flat.add(np.ascontiguousarray(x[i : i + CHUNK]))
    truth = flat.search(q, K)[1]
    return {"x": x, "queries": q, "truth": truth}


def bench_graph(m: int, efc: int, data: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    x = data["x"]
    path = args.work / f"category-{len(x)}-sq8-M{m}-efc{efc}.faiss"
    build_s = cached_build(
        path.with_suffix(".json"),
        lambda: build_shard("faiss-sq8", np.ascontiguousarray(x), path, M=m, ef_construction=efc),
    )
    read_into_cache(path, 0, path.stat().st_size)
    shard = FaissHnswSq8Shard.load(path, ef_search=64)
    floats = x.shape[0] * x.shape[1] * 4
    out: dict[str, Any] = {
        "M": m, "ef_construction": efc, "build_s": build_s,
        "hot_bytes_per_vector": round((path.stat().st_size - floats) / len(x), 1), "settings": [],
    }  # fmt: skip

    def search(v: np.ndarray) -> np.ndarray:
        scores, ids = shard.search(v[None], args.fetch)
        top: np.ndarray = ids[0][np.argsort(-scores[0])[:K]]
        return top

    for ef in args.ef:
        for factor in args.rescore:
            shard.set_ef_search(ef)
            shard.set_rescore_factor(factor)
            row = {"ef_search": ef, "rescore_factor": factor, **measure(search, data["queries"], data["truth"], 500)}
            out["settings"].append(row)
            print(json.dumps({"M": m, "efc": efc, **row}), flush=True)
    out["resident_mb"] = round(mapped_resident([path]) / 2**20, 1)
    return out


def markdown(n: int, graphs: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# The 10M run's largest shard alone: graph settings side by side",
        "",
        f"`{command}` — {n:,} vectors x 512 (one powerlaw category, the 10M run's largest), faiss-sq8 shards, "
        f"one thread a query, {MIN_FETCH} hits asked, top 10 against the exact top 10 of the shard's vectors.",
        "",
        "| M / efConstruction | build s (2 threads) | hot B/vector | efSearch | rescore factor | recall@10 | p50 ms "
        "| p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in graphs:
        for s in g["settings"]:
            lines.append(
                f"| M{g['M']} / {g['ef_construction']} | {g['build_s']} | {g['hot_bytes_per_vector']} | "
                f"{s['ef_search']} | {s['rescore_factor']} | {s['recall@10']} | {s['p50_ms']} | {s['p99_ms']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_229_391, help="vectors (the 10M run's largest category)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--graph", nargs="+", default=["16:80", "32:200"], metavar="M:EFC")
    ap.add_argument("--ef", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--rescore", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--fetch", type=int, default=MIN_FETCH)
    ap.add_argument("--model", type=Path, default=Path("models/grocery-lite0-ms512"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-largest-shard")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    spectra = demo(args.model, Path("examples/grocery"))["spectra"]
    data = one_category(args.n, args.dim, args.queries, spectra, args.work)
    command = "python scripts/bench_largest_shard.py " + " ".join(sys.argv[1:])
    graphs = []
    for spec in args.graph:
        m, efc = (int(v) for v in spec.split(":"))
        graphs.append(bench_graph(m, efc, data, args))
        write_report(args.out, "bench_largest_shard", args.tag, command, graphs, markdown(args.n, graphs, command))
    sys.stdout.write(markdown(args.n, graphs, command))


if __name__ == "__main__":
    main()
