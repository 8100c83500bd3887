"""The load each shard group would take if the categories were split across nodes (issue #22, item 6).

    python scripts/simulate_shard_groups.py --dataset ../shared/datasets/grocery-store --groups 1 2 4 8 \
        --out docs/bench

Builds the default index of the train photos (the default model, no calibration queries: the build most users
run), sends every val photo through the service's own search path at k=10 (`SearchEngine.search_image`), and
records which shards each search touched: the router's probes and the shards added to fill k (`--k`). Then it splits
the categories into G groups, each a Deployment behind a fan-out tier that sends a query only to the groups
holding its probed shards, and reports per G, for two ways of splitting:
- `balanced`: the categories sorted by measured load (searches touching the shard x its vectors) and dealt
  to the least-loaded group (longest-processing-time first);
- `alphabetical`: equal runs of category names, what a split by hand tends to be.
Figures: groups a query fans out to (mean, p99), the busiest group's share of all queries and of all shard
searches, and its load against the mean (1.0 is perfect balance), and each group's share of the vectors (its
memory). Writes <out>/shard_groups.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from app.engine.search import resolve_params
from app.offline.build.build_index import BuildOptions, build_index
from app.offline.datasets.catalogue import write_catalogue
from app.offline.datasets.grocery import split_rows
from app.service.config import SHIPPED_MODEL_DIR, Settings
from app.service.engines import load_engine


def touched_shards(dataset: Path, work: Path, k: int) -> tuple[list[list[str]], dict[str, int]]:
    """For each val photo, the categories whose shards its search touched; and each category's vectors."""
    write_catalogue(work / "train.csv", split_rows(dataset, "train"))
    build_index(work / "train.csv", dataset, work / "index", SHIPPED_MODEL_DIR, BuildOptions(progress=False))
    engine = load_engine(Settings(index_dir=work / "index", model_dir=SHIPPED_MODEL_DIR))
    params = resolve_params(engine.manifest, k=k)
    names = [c.name for c in engine.manifest.categories]
    touched = []
    for row in split_rows(dataset, "val"):
        outcome = engine.search_image((dataset / row["image"]).read_bytes(), params)
        touched.append(sorted({names[p.category] for p in [*outcome.probes, *outcome.added]}))
    return touched, {c.name: c.n_vectors for c in engine.manifest.categories}


def split(load: dict[str, float], n_groups: int, how: str) -> dict[str, int]:
    names = sorted(load)
    if how == "alphabetical":
        return {name: i * n_groups // len(names) for i, name in enumerate(names)}
    totals = [0.0] * n_groups
    group = {}
    for name in sorted(names, key=lambda n: -load[n]):
        g = int(np.argmin(totals))
        group[name] = g
        totals[g] += load[name]
    return group


def simulate(touched: list[list[str]], vectors: dict[str, int], n_groups: int, how: str) -> dict[str, Any]:
    hits = {name: sum(name in t for t in touched) for name in vectors}
    group = split({n: hits[n] * vectors[n] + 1e-9 for n in vectors}, n_groups, how)
    fan_out = [len({group[c] for c in t}) for t in touched]
    queries = np.zeros(n_groups)
    work = np.zeros(n_groups)  # shard searches weighted by the shard's vectors
    for t in touched:
        for g in {group[c] for c in t}:
            queries[g] += 1
        for c in t:
            work[group[c]] += vectors[c]
    memory = np.zeros(n_groups)
    for name, n in vectors.items():
        memory[group[name]] += n
    return {
        "groups": n_groups,
        "split": how,
        "fan_out_mean": round(float(np.mean(fan_out)), 3),
        "fan_out_p99": float(np.percentile(fan_out, 99)),
        "busiest_share_of_queries": round(float(queries.max() / len(touched)), 3),
        "busiest_share_of_work": round(float(work.max() / work.sum()), 3),
        "work_imbalance": round(float(work.max() / work.mean()), 3),
        "memory_shares": [round(float(m / memory.sum()), 3) for m in sorted(memory, reverse=True)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--k", type=int, default=10, help="results a search asks for (fill adds shards to reach k SKUs)")
    ap.add_argument("--tag", default="", help="suffix of the output files: shard_groups-TAG.json")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        touched, vectors = touched_shards(args.dataset, Path(tmp), args.k)
    shards_a_query = float(np.mean([len(t) for t in touched]))
    rows = [simulate(touched, vectors, g, how) for g in args.groups for how in ("balanced", "alphabetical")]
    command = "python scripts/simulate_shard_groups.py " + " ".join(sys.argv[1:])
    out = {
        "command": command,
        "k": args.k,
        "queries": len(touched),
        "shards_a_query": round(shards_a_query, 3),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"shard_groups-{args.tag}" if args.tag else "shard_groups"
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Shard groups across nodes: the load each group would take",
        "",
        f"`{command}`: {len(touched)} val photos through the default build's search path (train photos, "
        f"{len(vectors)} categories, {sum(vectors.values())} vectors), {shards_a_query:.2f} shards a query "
        f"(probes + fill to k={args.k}).",
        "",
        "| groups | split | groups a query (mean / p99) | busiest group's share of queries | of work | work, "
        "busiest / mean | memory shares |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['groups']} | {r['split']} | {r['fan_out_mean']} / {r['fan_out_p99']:g} | "
            f"{r['busiest_share_of_queries']} | {r['busiest_share_of_work']} | {r['work_imbalance']} | "
            + ", ".join(f"{m:.2f}" for m in r["memory_shares"])
            + " |"
        )
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
