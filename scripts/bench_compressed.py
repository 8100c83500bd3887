"""Compressed shards (`--backend faiss-sq8`) against the float shards, at 1M and 10M vectors on one node.

    python scripts/bench_compressed.py --n 1000000 10000000 --out docs/bench

Data: the `powerlaw` synthetic vectors of bench_search.py (spectra fitted to grocery-lite0-ms512's real embeddings;
100 categories of Zipf-like size; 5 vectors a SKU), written in chunks to a memory-mapped file so that 10M x 512
floats (20 GB) never sit in RAM at once. Queries are fresh noisy views of random SKUs; exact top-10 over every
vector is the ground truth.

Methods, each searched as the service searches (router with probe_mass 0.9 and at most 8 shards, fitted on the
data's categories; each probed shard asked for --fetch hits, the service's MIN_FETCH; merged; top 10):
- float: one faiss IndexHNSWFlat per category, memory-mapped (today's default backend). Built only up to
  --float-max-n vectors: at 10M its files alone are larger than the node this aims at.
- sq8: faiss IndexRefineFlat(IndexHNSWSQ 8-bit) per category (the faiss-sq8 backend, app/artifacts/shards.py):
  the graph walks 8-bit codes; with rescore factor f >= 1 the best f x fetch candidates are re-scored from the
  float vectors in the same memory-mapped file, with f = 0 the codes' own ranking and scores are kept and no
  float row is read.

Reported: bytes per vector on disk, split into what a search touches everywhere (graph + codes: must stay
resident for the latency below) and the float vectors (read a few rows a query: page cache, evictable); the
shard files' pages resident in the process after loading and after every query of the sweep (smaps Rss); build
time (2 threads); recall@10 against exact, single-query p50/p99 on one thread and QPS with 2 threads, swept over
efSearch and the rescore factor; and one pass with the float vectors dropped from the page cache (every
re-scored row read from disk: the worst case of a node whose memory holds only the graph and codes). Writes
<out>/bench_compressed.json and .md after each size.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil
from bench_search import (  # scripts/ is on sys.path when a script runs
    Routed,
    _spectra_tag,
    _zipf_labels,
    cached_build,
    demo,
    level_spread,
    measure,
)
from benchlib import write_report

from app.artifacts.shards import FaissHnswShard, FaissHnswSq8Shard, build_shard
from app.engine.routing import select_probes
from app.engine.search import MIN_FETCH
from app.offline.routing.fit import fit_linear_router, fit_temperature

K = 10
CHUNK = 200_000  # rows generated, normalised or scanned at a time (200k x 512 floats = 400 MB)


# --- data -------------------------------------------------------------------------------------------------------
def write_unit_rows(path: Path, n: int, dim: int, rows: Callable[[int, int], np.ndarray]) -> None:
    """n float32 rows made CHUNK at a time by `rows(start, count)`, in order, normalised to unit length and written
    to a .npy file that appears whole or not at all."""
    tmp = path.with_suffix(".tmp.npy")
    x = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    for i in range(0, n, CHUNK):
        chunk = rows(i, min(CHUNK, n - i))
        x[i : i + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    x.flush()
    del x
    os.replace(tmp, path)


def powerlaw_memmap(
    n: int, n_cat: int, dim: int, n_queries: int, spectra: dict[str, Any], work: Path
) -> dict[str, Any]:
    """bench_search.synthetic_powerlaw's distribution, generated chunk by chunk into `work` (cached by size and
    spectra). Labels come sorted, so rows are already grouped by category as an index stores them."""
    name = f"powerlaw-{n // 1000}k-{_spectra_tag(spectra)}"
    path, meta = work / f"{name}.f32", work / f"{name}.npz"
    labels = _zipf_labels(n, n_cat)
    if not meta.exists():
        rng = np.random.default_rng(n)
        spread = level_spread(rng, dim, spectra)
        mean = rng.normal(size=dim).astype(np.float32)
        mean *= spectra["mean_norm"] / np.linalg.norm(mean)
        cat_centres = mean + spread(n_cat, "category")
        n_sku = n // 5
        sku_cat = labels[np.arange(n_sku) * 5]
        sku_centres = np.empty((n_sku, dim), np.float32)
        for i in range(0, n_sku, CHUNK):
            m = min(CHUNK, n_sku - i)
            sku_centres[i : i + m] = cat_centres[sku_cat[i : i + m]] + spread(m, "sku")
        write_unit_rows(path, n, dim, lambda i, m: spread(m, "photo") + sku_centres[np.arange(i, i + m) // 5])
        q_sku = rng.integers(0, n_sku, size=2 * n_queries)
        q = sku_centres[q_sku] + spread(len(q_sku), "photo")
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        np.savez(meta, queries=q[:n_queries], calibration=q[n_queries:], calibration_labels=sku_cat[q_sku][n_queries:])
        del sku_centres
        gc.collect()
    saved = np.load(meta)
    return {
        "name": name,
        "x": np.load(path, mmap_mode="r"),
        "labels": labels,
        "queries": saved["queries"].astype(np.float32),
        "calibration": saved["calibration"].astype(np.float32),
        "calibration_labels": saved["calibration_labels"],
    }


def exact_truth(x: np.ndarray, q: np.ndarray, work: Path, name: str) -> np.ndarray:
    """Exact top-K of every query over every vector, scanning `x` in chunks (cached)."""
    path = work / f"{name}-truth{len(q)}.npy"
    if path.exists():
        cached: np.ndarray = np.load(path)
        return cached
    best_s = np.full((len(q), K), -np.inf, np.float32)
    best_i = np.zeros((len(q), K), np.int64)
    for start in range(0, len(x), CHUNK):
        s = q @ np.asarray(x[start : start + CHUNK]).T
        part = np.argpartition(-s, K, axis=1)[:, :K]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        top = np.argsort(-cand_s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(cand_s, top, axis=1), np.take_along_axis(cand_i, top, axis=1)
    np.save(path, best_i)
    return best_i


# --- memory and page cache --------------------------------------------------------------------------------------
def mapped_resident(paths: list[Path]) -> int:
    """Bytes of these files resident in this process's mappings (/proc/self/smaps Rss): the shards' own pages,
    whatever else the process maps or allocates."""
    wanted = {str(p.resolve()) for p in paths}
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            inside = len(head) > 5 and head[5] in wanted
        elif inside and head[0] == "Rss:":
            total += int(head[1]) * 1024
    return total


def float_region(path: Path, n: int, dim: int) -> tuple[int, int]:
    """Where an IndexRefineFlat file keeps its float vectors: faiss writes the base index, then the refine
    index's codes (n x dim floats), then k_factor (one float)."""
    size = path.stat().st_size
    length = n * dim * 4
    return size - 4 - length, length


def read_into_cache(path: Path, start: int, end: int) -> None:
    """Read bytes [start, end) of a file, so that they sit in the page cache."""
    with path.open("rb") as fh:
        fh.seek(start)
        while fh.tell() < end and fh.read(min(1 << 24, end - fh.tell())):
            pass


def drop_floats(shard: FaissHnswSq8Shard, path: Path) -> None:
    """Evict the shard's float vectors: unmap them from this process (MADV_DONTNEED on the view faiss mapped),
    then ask the kernel to drop those clean file pages (POSIX_FADV_DONTNEED); the next read goes to disk
    (checked with util-linux `fincore`: the file's cached pages fall to its hot part)."""
    view = shard._stored()  # the zero-copy view of the mapping itself, not rows() (a copy)
    if view.size == 0:
        return
    page = mmap.PAGESIZE
    addr = view.__array_interface__["data"][0]
    start = addr - addr % page
    length = view.nbytes + (addr - start)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 4) != 0:  # MADV_DONTNEED
        raise OSError(ctypes.get_errno(), "madvise")
    offset, nbytes = float_region(path, shard.ntotal, shard.dim)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_pass(fn: Any, q: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """One pass, no warm-up: each query's first read of its candidates' float rows."""
    lat, hits = [], 0
    for i in range(len(q)):
        t0 = time.perf_counter()
        got = fn(q[i])
        lat.append((time.perf_counter() - t0) * 1000)
        hits += len(set(got.tolist()) & set(truth[i].tolist()))
    return {
        "recall@10": round(hits / (K * len(q)), 4),
        "p50_ms": round(float(np.percentile(lat, 50)), 4),
        "p99_ms": round(float(np.percentile(lat, 99)), 4),
    }


# --- one size ---------------------------------------------------------------------------------------------------
def bench_size(n: int, spectra: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    data = powerlaw_memmap(n, args.categories, args.dim, args.queries, spectra, args.work)
    x, labels, q = data["x"], data["labels"], data["queries"]
    gen_s = time.perf_counter() - t0
    n_cat = int(labels.max()) + 1
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_cat))])
    t0 = time.perf_counter()
    truth = exact_truth(x, q, args.work, data["name"])
    truth_s = time.perf_counter() - t0
    router = fit_linear_router(np.asarray(x[:: max(1, n // 500_000)]), labels[:: max(1, n // 500_000)],
                               [f"c{i}" for i in range(n_cat)])  # fmt: skip
    router.temperature = fit_temperature(router.logits(data["calibration"]), data["calibration_labels"])
    probs = router.predict_proba(q)
    probes = [len(select_probes(p, probe_mass=0.9, max_probes=8)) for p in probs]
    out: dict[str, Any] = {
        "dataset": data["name"], "n": n, "dim": args.dim, "categories": n_cat, "queries": len(q),
        "largest_category": int(np.diff(offsets).max()), "generate_s": round(gen_s, 1), "truth_s": round(truth_s, 1),
        "router_top1": round(float((probs.argmax(1) == labels[truth[:, 0]]).mean()), 4),
        "shards_per_query": round(float(np.mean(probes)), 2),
        "fetch": args.fetch, "methods": {}, "settings": [],
    }  # fmt: skip
    print(json.dumps({k: v for k, v in out.items() if k not in ("methods", "settings")}), flush=True)
    kinds = ["sq8"] + (["float"] if n <= args.float_max_n else [])
    for kind in kinds:
        bench_method(kind, x, offsets, q, truth, router, out, args, data["name"])
    del x, data
    gc.collect()
    return out


def bench_method(
    kind: str, x: np.ndarray, offsets: np.ndarray, q: np.ndarray, truth: np.ndarray, router: Any,
    out: dict[str, Any], args: argparse.Namespace, name: str,
) -> None:  # fmt: skip
    paths, build_s = built(kind, x, offsets, args, name)
    shards, method = loaded(kind, paths, offsets, x.shape, build_s)
    routed = Routed(router, shards, offsets, fetch=args.fetch)
    for ef in args.ef:
        for factor in args.rescore if kind == "sq8" else [None]:
            configure(shards, ef, factor)
            m = measure(routed, q, truth, args.qps_queries)
            row = {"method": kind, "ef_search": ef, "rescore_factor": factor, **m}
            out["settings"].append(row)
            print(json.dumps(row), flush=True)
    method["resident_after_queries_mb"] = round(mapped_resident(paths) / 2**20, 1)
    if kind == "sq8":
        method["codes_score_error"] = score_error(shards, router, q[:200], args.fetch)
        method["floats_cold"] = []
        for setting in args.cold:
            ef, factor = (int(v) for v in setting.split(":"))
            configure(shards, ef, 0)
            for v in q[:20]:  # warm-up that reads no float row: the pass below times only the floats' reads
                routed(v)
            configure(shards, ef, factor)
            for shard, path in zip(shards, paths, strict=True):
                drop_floats(shard, path)
            cold = {"ef_search": ef, "rescore_factor": factor, **cold_pass(routed, q, truth)}
            method["floats_cold"].append(cold)
            print(json.dumps({"floats_cold": cold}), flush=True)
    out["methods"][kind] = method
    print(json.dumps({kind: method}), flush=True)
    del shards, routed
    gc.collect()


def score_error(shards: list[Any], router: Any, q: np.ndarray, fetch: int) -> dict[str, float]:
    """How far the codes' own scores (rescore factor 0) are from the exact inner products of the same hits, on
    each query's first probed shard: what open-set thresholds, fitted on exact scores, see."""
    configure(shards, 128, 0)
    errors = []
    for query in q:
        shard = shards[int(np.argmax(router.probabilities(query)))]
        scores, ids = shard.search(query[None], fetch)
        keep = ids[0] >= 0
        errors.append(np.abs(scores[0][keep] - shard.rows(ids[0][keep]) @ query))
    e = np.concatenate(errors)
    return {
        "mean": round(float(e.mean()), 5),
        "p99": round(float(np.percentile(e, 99)), 5),
        "max": round(float(e.max()), 5),
    }


def configure(shards: list[Any], ef: int, factor: int | None) -> None:
    for shard in shards:
        shard.set_ef_search(ef)
        if factor is not None:
            shard.set_rescore_factor(factor)


def built(
    kind: str, x: np.ndarray, offsets: np.ndarray, args: argparse.Namespace, name: str
) -> tuple[list[Path], float]:
    """One shard file per category, built once (cached under --work) with the backend's own build code."""
    backend = "faiss-sq8" if kind == "sq8" else "faiss"
    n_cat = len(offsets) - 1
    sdir = args.work / f"{name}-{kind}-M{args.M}-efc{args.ef_construction}"
    sdir.mkdir(parents=True, exist_ok=True)
    paths = [sdir / f"{c:04d}.faiss" for c in range(n_cat)]

    def build() -> None:
        for c in range(n_cat):
            part = np.ascontiguousarray(x[offsets[c] : offsets[c + 1]])
            build_shard(backend, part, paths[c], M=args.M, ef_construction=args.ef_construction)  # type: ignore[arg-type]
            if c % 10 == 0:
                print(f"  {kind}: built shard {c + 1}/{n_cat}", flush=True)

    return paths, cached_build(sdir / "build.json", build)


def loaded(
    kind: str, paths: list[Path], offsets: np.ndarray, shape: tuple[int, int], build_s: float
) -> tuple[list[Any], dict[str, Any]]:
    """The shards read into the page cache as far as memory allows (floats first, then the graph and codes, which
    stay the most recent), loaded as the service loads them (mmap), and their sizes."""
    n, dim = shape
    ends = [
        float_region(p, int(offsets[c + 1] - offsets[c]), dim)[0] if kind == "sq8" else 0 for c, p in enumerate(paths)
    ]
    for p, hot_end in zip(paths, ends, strict=True):  # every file's floats, then every file's hot part
        read_into_cache(p, hot_end, p.stat().st_size)
    for p, hot_end in zip(paths, ends, strict=True):
        read_into_cache(p, 0, hot_end)
    t0 = time.perf_counter()
    cls = FaissHnswSq8Shard if kind == "sq8" else FaissHnswShard
    shards: list[Any] = [cls.load(p, ef_search=64) for p in paths]
    load_s = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in paths)
    floats = n * dim * 4
    hot = disk - floats if kind == "sq8" else disk
    method = {
        "backend": "faiss-sq8" if kind == "sq8" else "faiss", "build_s": build_s, "load_s": round(load_s, 3),
        "disk_bytes_per_vector": round(disk / n, 1), "hot_bytes_per_vector": round(hot / n, 1),
        "hot_gb": round(hot / 1e9, 2), "float_gb": round(floats / 1e9, 2),
        "resident_after_load_mb": round(mapped_resident(paths) / 2**20, 1),
    }  # fmt: skip
    return shards, method


# --- report -----------------------------------------------------------------------------------------------------
def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Compressed shards (faiss-sq8) against float shards",
        "",
        f"`{command}` — {os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
        f"{platform.python_version()}, faiss {faiss.__version__}. Single-query latency on one thread, QPS with 2 "
        "threads, recall@10 against exact search over every vector; router probe_mass 0.9, at most 8 shards, each "
        f"probed shard asked for {results[0].get('fetch', MIN_FETCH)} hits as the service asks. Hot bytes: the graph "
        "and codes a search walks (kept resident); floats: read only where rescore factor >= 1 (f x 64 rows a "
        "probed shard). Files are read into the page cache before the sweep as far as memory allows.",
    ]
    for r in results:
        lines += [
            "",
            f"## {r['dataset']}: {r['n']:,} vectors x {r['dim']}, {r['categories']} categories (largest "
            f"{r['largest_category']:,}), {r['queries']} queries; router top-1 {r['router_top1']}, "
            f"{r['shards_per_query']} shards a query",
            "",
            "| method | build s (2 threads) | disk B/vector | hot B/vector | hot GB | floats GB "
            "| resident after load MB | resident after the queries MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for kind, m in r["methods"].items():
            lines.append(
                f"| {kind} | {m['build_s']} | {m['disk_bytes_per_vector']} | {m['hot_bytes_per_vector']} | "
                f"{m['hot_gb']} | {m['float_gb'] if kind == 'sq8' else '(in hot)'} | {m['resident_after_load_mb']} "
                f"| {m['resident_after_queries_mb']} |"
            )
        lines += [
            "",
            "| method | efSearch | rescore factor | recall@10 | p50 ms | p99 ms | QPS (2 threads) |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in r["settings"]:
            lines.append(
                f"| {s['method']} | {s['ef_search']} | {_factor(s['rescore_factor'])} | {s['recall@10']} | "
                f"{s['p50_ms']} | {s['p99_ms']} | {s['qps_2_threads']} |"
            )
        err = r["methods"].get("sq8", {}).get("codes_score_error")
        if err:
            lines += [
                "",
                "sq8 scores from the codes alone (rescore factor 0) against the exact inner products of the same "
                f"hits: mean error {err['mean']}, p99 {err['p99']}, max {err['max']}.",
            ]
        colds = r["methods"].get("sq8", {}).get("floats_cold", [])
        if colds:
            lines += [
                "",
                "sq8 with its float vectors dropped from the page cache (one pass, no warm-up: each re-scored row's "
                "page read from disk on first touch; the worst case of a node whose memory holds only the hot "
                "bytes):",
                "",
                "| efSearch | rescore factor | recall@10 | p50 ms | p99 ms |",
                "|---|---|---|---|---|",
                *[
                    f"| {c['ef_search']} | {_factor(c['rescore_factor'])} | {c['recall@10']} | {c['p50_ms']} "
                    f"| {c['p99_ms']} |"
                    for c in colds
                ],
            ]
    return "\n".join(lines) + "\n"


def _factor(factor: int | None) -> str:
    return "" if factor is None else "0 (codes only)" if factor == 0 else str(factor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--categories", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--qps-queries", type=int, default=1000)
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--fetch", type=int, default=MIN_FETCH, help="hits asked of each probed shard (the service's)")
    ap.add_argument("--ef", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--rescore", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--cold", nargs="+", default=["128:0", "128:1", "128:2"], metavar="EF:FACTOR", help="settings timed cold"
    )
    ap.add_argument("--float-max-n", type=int, default=1_000_000, help="largest size the float shards are built at")
    ap.add_argument("--model", type=Path, default=Path("models/grocery-lite0-ms512"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-compressed")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--tag", default="", help="suffix of the output files: bench_compressed-<tag>.json/.md")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    spectra = demo(args.model, Path("examples/grocery"))["spectra"]
    command = "python scripts/bench_compressed.py " + " ".join(sys.argv[1:])
    results = []
    for n in args.n:
        results.append(bench_size(n, spectra, args))
        write_report(args.out, "bench_compressed", args.tag, command, results, markdown(results, command))
    sys.stdout.write(markdown(results, command))


if __name__ == "__main__":
    main()
