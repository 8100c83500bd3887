"""The search engine against its baselines, side by side in one run, on the same vectors and queries.

    python scripts/bench_search.py --n 100000 1000000 --demo --out docs/bench

Data: synthetic clustered unit vectors at grocery-lite0-ms512's dimension (--n each; --categories categories of
uneven, Zipf-like size; 5 vectors per SKU; queries are fresh noisy views of random SKUs), and with --demo the
real embeddings of the demo catalogue (queries: the demo's val and calibration photos).

Methods (all inner product on unit vectors):
- routed-faiss-hnsw-mmap: this service's path. Learnt linear router (calibrated temperature) -> probe shards
  until probe_mass (at most --max-probes) -> one faiss IndexHNSWFlat per category, memory-mapped -> merge.
- global-faiss-hnsw: one faiss IndexHNSWFlat over everything (in RAM).
- routed-hnswlib: the same router and partitions, hnswlib shards.
- ivf-flat-same-partitions: faiss IndexIVFFlat whose lists are the categories (quantizer: category centroids),
  probed by nearest centroid (nprobe).
- exact: numpy matrix-vector product over everything (the ground truth).

Reported per setting: recall@10 against exact, single-query p50/p99 (one thread), QPS with 2 threads, and per
method build time, bytes on disk, load time, private memory (USS) added by loading. efSearch and probing are
swept; the Pareto frontier (recall@10 up, p99 down) is printed. Writes <out>/bench_search.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil
from benchlib import write_report  # scripts/ is on sys.path when a script runs
from faiss.contrib.ivf_tools import add_preassigned

from app.artifacts.hashing import sha256_file
from app.artifacts.shards import FaissHnswShard, HnswlibShard
from app.engine.routing import LinearRouter, select_probes
from app.offline.routing.fit import fit_linear_router, fit_temperature

K = 10
SearchFn = Callable[[np.ndarray], np.ndarray]  # one query (d,) -> up to K global ids


# --- data ------------------------------------------------------------------------------------------------------
def _zipf_labels(n: int, n_cat: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n_cat + 1) ** 0.8  # uneven category sizes
    sizes = np.maximum(5, np.floor(weights / weights.sum() * n)).astype(int)
    sizes[0] += n - sizes.sum()
    return np.repeat(np.arange(n_cat), sizes)


def synthetic(n: int, n_cat: int, dim: int, n_queries: int, seed: int) -> dict[str, Any]:
    """Isotropic: every level's spread is the same in all 512 directions (a worst case for graph search; real
    embeddings are far from it, see synthetic_powerlaw)."""
    rng = np.random.default_rng(seed)
    labels = _zipf_labels(n, n_cat)
    cat_centres = rng.normal(size=(n_cat, dim)).astype(np.float32)
    n_sku = n // 5
    sku_of = np.arange(n) // 5
    sku_cat = labels[np.arange(n_sku) * 5]
    sku_centres = cat_centres[sku_cat] + 0.9 * rng.normal(size=(n_sku, dim)).astype(np.float32)
    x = sku_centres[sku_of[:n]] + 0.6 * rng.normal(size=(n, dim)).astype(np.float32)
    q_sku = rng.integers(0, n_sku, size=2 * n_queries)
    q = sku_centres[q_sku] + 0.6 * rng.normal(size=(len(q_sku), dim)).astype(np.float32)
    return _dataset(f"synthetic-{n // 1000}k", x, labels, q, sku_cat[q_sku], n_queries)


LEVELS = ("category", "sku", "photo")


def embedding_spectra(x: np.ndarray, sku: np.ndarray, cat: np.ndarray) -> dict[str, Any]:
    """How real embeddings spread, level by level: the category centres around the mean, the SKU centres around
    their category's, the photos around their SKU's. Per level: total variance and the exponent a of a power law
    (eigenvalue i ~ i^-a) fitted to the top of its spectrum. The fit is extended to every dimension, which gives
    the synthetic data *more* effective dimensions than the real embeddings (a few hundred images cannot show the
    tail of a million-product catalogue's spectrum), so it errs on the hard side."""
    mean = x.mean(0)
    cat_mean = {c: x[cat == c].mean(0) for c in np.unique(cat)}
    sku_mean = {s: x[sku == s].mean(0) for s in np.unique(sku)}
    residuals = {
        "category": np.stack([cat_mean[c] - mean for c in cat]),
        "sku": np.stack([sku_mean[s] - cat_mean[c] for s, c in zip(sku, cat, strict=True)]),
        "photo": np.stack([v - sku_mean[s] for v, s in zip(x, sku, strict=True)]),
    }
    out: dict[str, Any] = {"mean_norm": round(float(np.linalg.norm(mean)), 3)}
    for level, r in residuals.items():
        ev = np.clip(np.linalg.eigvalsh(r.T.astype(np.float64) @ r / len(r))[::-1], 0, None)
        rank = int((ev > ev[0] * 1e-6).sum())
        top = max(5, min(rank // 2, 40))
        slope = np.polyfit(np.log(np.arange(1, top + 1)), np.log(ev[:top]), 1)[0]
        out[level] = {
            "variance": round(float(ev.sum()), 4),
            "exponent": round(float(-slope), 2),
            "participation_ratio": _participation(ev),
        }
    return out


def participation_ratio(x: np.ndarray, limit: int = 20_000) -> float:
    """Effective number of dimensions, (sum of eigenvalues)^2 / sum of squares: 512 for isotropic noise."""
    sample = x[:: max(1, len(x) // limit)].astype(np.float64)
    return _participation(np.clip(np.linalg.eigvalsh(np.cov(sample.T)), 0, None))


def _participation(eigenvalues: np.ndarray) -> float:
    return round(float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum()), 1)


def level_spread(rng: np.random.Generator, dim: int, spectra: dict[str, Any]) -> Callable[[int, str], np.ndarray]:
    """`spread(rows, level)`: rows of a level's power-law noise (spectra as embedding_spectra measures them),
    each level along its own random orthonormal basis, drawn from `rng` in order."""
    scale, basis = {}, {}
    for level in LEVELS:
        p = np.arange(1, dim + 1, dtype=np.float64) ** -spectra[level]["exponent"]
        scale[level] = np.sqrt(spectra[level]["variance"] * p / p.sum()).astype(np.float32)
        basis[level] = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)

    def spread(rows: int, level: str) -> np.ndarray:
        out = np.empty((rows, dim), dtype=np.float32)
        for i in range(0, rows, 100_000):  # chunks keep 1M x 512 temporaries small
            m = min(100_000, rows - i)
            out[i : i + m] = (rng.normal(size=(m, dim)).astype(np.float32) * scale[level]) @ basis[level]
        return out

    return spread


def synthetic_powerlaw(
    n: int, n_cat: int, dim: int, n_queries: int, seed: int, spectra: dict[str, Any]
) -> dict[str, Any]:
    """Clustered like synthetic(), but each level spreads with the power-law spectrum and the variance measured
    on grocery-lite0-ms512's real embeddings (embedding_spectra), each level along its own random orthonormal basis."""
    rng = np.random.default_rng(seed)
    labels = _zipf_labels(n, n_cat)
    spread = level_spread(rng, dim, spectra)
    mean = rng.normal(size=dim).astype(np.float32)
    mean *= spectra["mean_norm"] / np.linalg.norm(mean)
    cat_centres = mean + spread(n_cat, "category")
    n_sku = n // 5
    sku_cat = labels[np.arange(n_sku) * 5]
    sku_centres = cat_centres[sku_cat] + spread(n_sku, "sku")
    x = spread(n, "photo")
    x += sku_centres[np.arange(n) // 5]
    q_sku = rng.integers(0, n_sku, size=2 * n_queries)
    q = sku_centres[q_sku] + spread(len(q_sku), "photo")
    name = f"powerlaw-{n // 1000}k-{_spectra_tag(spectra)}"
    return {**_dataset(name, x, labels, q, sku_cat[q_sku], n_queries), "spectra": spectra}


def _dataset(
    name: str, x: np.ndarray, labels: np.ndarray, q: np.ndarray, q_labels: np.ndarray, n_queries: int
) -> dict[str, Any]:
    """Unit vectors; the first n_queries queries are measured, the rest calibrate the router's temperature."""
    return {
        "name": name,
        "x": _unit(x),
        "labels": labels,
        "queries": _unit(q[:n_queries]),
        "calibration": _unit(q[n_queries:]),
        "calibration_labels": q_labels[n_queries:],
    }


def _spectra_tag(spectra: dict[str, Any]) -> str:
    """Short fingerprint of the fitted spectra: cached builds are reused only for the same data."""
    return hashlib.sha256(json.dumps(spectra, sort_keys=True).encode()).hexdigest()[:8]


def demo(model: Path, root: Path) -> dict[str, Any]:
    from app.engine.embedding import OnnxEmbedder
    from app.engine.imaging import decode_image
    from app.offline.datasets.catalogue import read_catalogue

    embedder = OnnxEmbedder(model)

    def embed(csv: Path) -> tuple[np.ndarray, list[str]]:
        rows = read_catalogue(csv)[0]
        vecs = [
            embedder.embed(
                embedder.preprocess(decode_image((root / "images" / r.image).read_bytes(), max_pixels=10**8))[None]
            )[0]
            for r in rows
        ]
        return np.asarray(vecs, dtype=np.float32), [r.category for r in rows]

    x, cats = embed(root / "catalogue.csv")
    skus = [r.sku for r in read_catalogue(root / "catalogue.csv")[0]]
    q1, _ = embed(root / "queries.csv")
    q2, qcats = embed(root / "calibration.csv")
    names = sorted(set(cats))
    return {
        "name": f"demo-{len(x)}",
        "x": x,
        "labels": np.asarray([names.index(c) for c in cats]),
        "queries": np.vstack([q1, q2]),
        "calibration": q2,
        "calibration_labels": np.asarray([names.index(c) if c in names else 0 for c in qcats]),
        "spectra": embedding_spectra(x, np.asarray(skus), np.asarray(cats)),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def exact_topk(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(q), k), dtype=np.int64)
    for i in range(0, len(q), 64):
        s = q[i : i + 64] @ x.T
        part = np.argpartition(-s, k, axis=1)[:, :k]
        order = np.take_along_axis(s, part, axis=1).argsort(axis=1)[:, ::-1]
        out[i : i + 64] = np.take_along_axis(part, order, axis=1)
    return out


# --- measurement ------------------------------------------------------------------------------------------------
def uss() -> int:
    gc.collect()
    return int(psutil.Process().memory_full_info().uss)


def measure(fn: SearchFn, q: np.ndarray, truth: np.ndarray, qps_queries: int, repeats: int = 1) -> dict[str, Any]:
    """recall@10, single-query p50/p99 and 2-thread QPS. With repeats > 1 the timings are taken that many times
    back to back: the row holds their medians, each repeat's figures under `repeats`, and `recall_se`, the
    standard error of recall@10 over the queries (the search itself is deterministic)."""
    for i in range(min(20, len(q))):  # warm-up
        fn(q[i])
    runs = [_measure_once(fn, q, truth, qps_queries) for _ in range(repeats)]
    if repeats == 1:
        return runs[0][0]
    timings = ("p50_ms", "p99_ms", "qps_2_threads")
    per_query = runs[0][1] / K
    return {
        **runs[0][0],
        **{k: round(float(np.median([r[0][k] for r in runs])), 4) for k in timings},
        "recall_se": round(float(per_query.std(ddof=1) / np.sqrt(len(per_query))), 5),
        "repeats": {k: [r[0][k] for r in runs] for k in timings},
    }


def _measure_once(
    fn: SearchFn, q: np.ndarray, truth: np.ndarray, qps_queries: int
) -> tuple[dict[str, float], np.ndarray]:
    lat, hits = [], []
    for i in range(len(q)):
        t0 = time.perf_counter()
        got = fn(q[i])
        lat.append((time.perf_counter() - t0) * 1000)
        hits.append(len(set(got.tolist()) & set(truth[i].tolist())))
    sub = q[: min(qps_queries, len(q))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(fn, sub))
    qps = len(sub) / (time.perf_counter() - t0)
    figures = {
        "recall@10": round(sum(hits) / (K * len(q)), 4),
        "p50_ms": round(float(np.percentile(lat, 50)), 4),
        "p99_ms": round(float(np.percentile(lat, 99)), 4),
        "qps_2_threads": round(qps, 1),
    }
    return figures, np.asarray(hits, dtype=np.float64)


def cached_build(marker: Path, build: Callable[[], None]) -> float:
    """Build once per data and parameters; a later run reuses the files and reports the build time measured
    when they were built (2 threads)."""
    if marker.exists():
        return float(json.loads(marker.read_text())["build_s"])
    faiss.omp_set_num_threads(2)
    t0 = time.perf_counter()
    build()
    build_s = round(time.perf_counter() - t0, 2)
    faiss.omp_set_num_threads(1)  # searches are single-threaded; parallelism comes from the client threads
    marker.write_text(json.dumps({"build_s": build_s}))
    return build_s


def disk_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


class Routed:
    """Router + per-category shards: the service's search path without HTTP, decode or grouping. Each probed
    shard is asked for `fetch` hits (K here; the service asks max(k x overfetch, MIN_FETCH), which
    bench_compressed.py uses), merged, top K."""

    def __init__(self, router: LinearRouter, shards: list[Any], offsets: np.ndarray, fetch: int = K) -> None:
        self.router, self.shards, self.offsets, self.fetch = router, shards, offsets, fetch
        self.probe_mass, self.max_probes = 0.9, 8

    def __call__(self, query: np.ndarray) -> np.ndarray:
        probes = select_probes(self.router.probabilities(query), probe_mass=self.probe_mass, max_probes=self.max_probes)
        qs = query[None]
        scores, ids = [], []
        for p in probes:
            s, i = self.shards[p.category].search(qs, self.fetch)
            keep = i[0] >= 0
            scores.append(s[0][keep])
            ids.append(i[0][keep] + self.offsets[p.category])
        all_s, all_i = np.concatenate(scores), np.concatenate(ids)
        top: np.ndarray = all_i[np.argsort(-all_s)[:K]]
        return top


def bench_dataset(data: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    x, labels, q = data["x"], data["labels"], data["queries"]
    n, dim = x.shape
    n_cat = int(labels.max()) + 1
    order = np.argsort(labels, kind="stable")  # rows grouped by category, as the index stores them
    x, labels = x[order], labels[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=n_cat))])
    t0 = time.perf_counter()
    truth = exact_topk(x, q, K) if not args.build_only else np.zeros((len(q), K), dtype=np.int64)
    exact_build_s = time.perf_counter() - t0
    out: dict[str, Any] = {"dataset": data["name"], "n": n, "dim": dim, "categories": n_cat, "queries": len(q)}
    out["category_sizes"] = {"min": int(np.diff(offsets).min()), "max": int(np.diff(offsets).max())}
    out["participation_ratio"] = participation_ratio(x)
    if "spectra" in data:
        out["spectra"] = data["spectra"]
    methods: dict[str, Any] = {}
    settings_rows: list[dict[str, Any]] = []

    t0 = time.perf_counter()
    router = fit_linear_router(x, labels, [f"c{i}" for i in range(n_cat)], steps=0 if args.build_only else 400)
    router.temperature = fit_temperature(router.logits(data["calibration"]), data["calibration_labels"])
    router_s = time.perf_counter() - t0
    # Agreement of the router's top category with the category of the exact nearest neighbour.
    out["router_top1"] = round(float((router.predict_proba(q).argmax(1) == labels[truth[:, 0]]).mean()), 4)

    def record(
        method: str, setting: dict[str, Any], fn: SearchFn, extra: dict[str, Any] | None = None, n_q: int | None = None
    ) -> None:
        m = measure(fn, q[:n_q], truth[:n_q], min(args.qps_queries, n_q or len(q)), args.repeats)
        row = {"method": method, **setting, **m, **(extra or {})}
        settings_rows.append(row)
        print(json.dumps(row), flush=True)

    # exact
    x_exact = np.ascontiguousarray(x)
    methods["exact"] = {"build_s": round(exact_build_s, 2), "disk_mb": round(x.nbytes / 2**20, 1), "load_s": 0.0}
    # The scan's cost does not depend on the query: --exact-queries (200) time it (recall is 1 by definition).
    if not args.build_only:
        record("exact", {}, lambda v: np.argpartition(-(x_exact @ v), K)[:K], n_q=args.exact_queries)

    # routed faiss HNSW shards, memory-mapped (the service's path)
    backends = [("faiss", FaissHnswShard)] + ([] if "hnswlib" in args.skip else [("hnswlib", HnswlibShard)])
    for backend, cls in backends:
        sdir = work / f"{data['name']}-{backend}-M{args.M}-efc{args.ef_construction}"
        sdir.mkdir(parents=True, exist_ok=True)
        paths = [sdir / f"{c:04d}.idx" for c in range(n_cat)]

        def build_shards(cls: Any = cls, paths: list[Path] = paths) -> None:
            for c in range(n_cat):
                cls.build(x[offsets[c] : offsets[c + 1]], paths[c], M=args.M, ef_construction=args.ef_construction)

        build_s = cached_build(sdir / "build.json", build_shards)
        if args.build_only:
            continue
        # Start-up of the service's path = verify every file's sha256 (as app/artifacts/manifest.py does, in parallel)
        # + map the shards; the model load and warm-up come on top (docs/benchmarks.md).
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            list(pool.map(sha256_file, paths))
        verify_s = time.perf_counter() - t0
        before = uss()
        t0 = time.perf_counter()
        if backend == "faiss":
            shards: list[Any] = [FaissHnswShard.load(p, ef_search=64) for p in paths]
        else:
            shards = [HnswlibShard.load(p, dim=dim, ef_search=64) for p in paths]
        load_s = time.perf_counter() - t0
        name = "routed-faiss-hnsw-mmap" if backend == "faiss" else "routed-hnswlib"
        methods[name] = {
            "build_s": round(build_s + router_s, 2),
            "disk_mb": round(disk_bytes(paths) / 2**20, 1),
            "load_s": round(load_s, 4),
            "verify_sha256_s": round(verify_s, 3),
            "uss_added_mb": round((uss() - before) / 2**20, 1),
        }
        routed = Routed(router, shards, offsets)
        probs = router.predict_proba(q)
        for ef in args.ef:
            for s in shards:
                s.set_ef_search(ef)
            for mass in args.probe_mass:
                if backend == "hnswlib" and mass not in (0.9, 0.99):
                    continue
                routed.probe_mass = mass
                setting = {"ef_search": ef, "probe_mass": mass, "max_probes": routed.max_probes}
                probes = [len(select_probes(p, probe_mass=mass, max_probes=routed.max_probes)) for p in probs]
                record(name, setting, routed, {"shards_per_query": round(float(np.mean(probes)), 2)})
        del shards, routed
        gc.collect()

    if "global" not in args.skip:
        bench_global(x, data["name"], args, work, methods, record)
    if args.build_only:
        return out
    if "ivf" not in args.skip:
        bench_ivf(x_exact, labels, offsets, methods, record, args)
    out["methods"] = methods
    out["settings"] = settings_rows
    out["pareto"] = pareto(settings_rows)
    return out


Record = Callable[..., None]


def bench_global(
    x: np.ndarray, name: str, args: argparse.Namespace, work: Path, methods: dict[str, Any], record: Record
) -> None:
    """One faiss HNSW over every vector, read into RAM."""
    path = work / f"{name}-global-M{args.M}-efc{args.ef_construction}.faiss"
    build_s = cached_build(
        path.with_suffix(".json"), lambda: FaissHnswShard.build(x, path, M=args.M, ef_construction=args.ef_construction)
    )
    if args.build_only:
        return
    before = uss()
    t0 = time.perf_counter()
    glob = FaissHnswShard.load(path, ef_search=64, mmap=False)
    methods["global-faiss-hnsw"] = {
        "build_s": round(build_s, 2),
        "disk_mb": round(path.stat().st_size / 2**20, 1),
        "load_s": round(time.perf_counter() - t0, 4),
        "uss_added_mb": round((uss() - before) / 2**20, 1),
    }
    for ef in args.ef:
        glob.set_ef_search(ef)
        record("global-faiss-hnsw", {"ef_search": ef}, lambda v, g=glob: g.search(v[None], K)[1][0])
    del glob
    gc.collect()


def bench_ivf(
    x_exact: np.ndarray,
    labels: np.ndarray,
    offsets: np.ndarray,
    methods: dict[str, Any],
    record: Record,
    args: argparse.Namespace,
) -> None:
    """faiss IVF-Flat whose lists are the categories: exact within the lists it scans."""
    n, dim = x_exact.shape
    n_cat = len(offsets) - 1
    x = x_exact
    t0 = time.perf_counter()
    centroids = np.stack([x[offsets[c] : offsets[c + 1]].mean(0) for c in range(n_cat)]).astype(np.float32)
    quantizer = faiss.IndexFlatIP(dim)
    quantizer.add(centroids)
    ivf = faiss.IndexIVFFlat(quantizer, dim, n_cat, faiss.METRIC_INNER_PRODUCT)
    ivf.is_trained = True
    add_preassigned(ivf, x_exact, labels.astype(np.int64))  # list = the vector's category, not its nearest centroid
    methods["ivf-flat-same-partitions"] = {
        "build_s": round(time.perf_counter() - t0, 2),
        "disk_mb": round((x.nbytes + 8 * n) / 2**20, 1),
        "load_s": None,
        "uss_added_mb": None,
    }
    for nprobe in args.nprobe:
        ivf.nprobe = nprobe
        record("ivf-flat-same-partitions", {"nprobe": nprobe}, lambda v, i=ivf: i.search(v[None], K)[1][0])


def pareto(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Settings no other setting beats on both recall@10 (higher) and p99 (lower)."""
    front = [
        r
        for r in rows
        if not any(
            o["recall@10"] >= r["recall@10"]
            and o["p99_ms"] <= r["p99_ms"]
            and (o["recall@10"], -o["p99_ms"]) != (r["recall@10"], -r["p99_ms"])
            for o in rows
        )
    ]
    return sorted(front, key=lambda r: r["p99_ms"])


def markdown(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Search engine benchmark",
        "",
        f"`{command}` — {os.cpu_count()} CPUs, Python {platform.python_version()}, faiss {faiss.__version__}. "
        "Single-query latency on one thread; QPS with 2 threads. recall@10 against exact search.",
    ]
    for r in results:
        lines += [
            "",
            f"## {r['dataset']}: {r['n']:,} vectors x {r['dim']}, {r['categories']} categories "
            f"({r['category_sizes']['min']}-{r['category_sizes']['max']} each), {r['queries']} queries; "
            f"router top-1 {r['router_top1']}; effective dimensions (participation ratio) {r['participation_ratio']}",
            "",
            *(_spectra_line(r["spectra"]) if "spectra" in r else []),
            "| method | build s | disk MB | load s | sha256 verify s | USS added MB |",
            "|---|---|---|---|---|---|",
            *[
                f"| {m} | {v['build_s']} | {v['disk_mb']} | {v['load_s']} | {v.get('verify_sha256_s', '')} "
                f"| {v.get('uss_added_mb')} |"
                for m, v in r["methods"].items()
            ],
            "",
            "| method | setting | recall@10 | p50 ms | p99 ms | QPS (2 threads) | shards/query |",
            "|---|---|---|---|---|---|---|",
        ]
        exact_qps = next(s["qps_2_threads"] for s in r["settings"] if s["method"] == "exact")
        for s in r["settings"]:
            setting = ", ".join(f"{k}={s[k]}" for k in ("ef_search", "probe_mass", "nprobe") if k in s)
            ratio = s["qps_2_threads"] / exact_qps
            lines.append(
                f"| {s['method']} | {setting} | {s['recall@10']} | {s['p50_ms']} | {s['p99_ms']} | "
                f"{s['qps_2_threads']} ({ratio:.0f}x exact) | {s.get('shards_per_query', '')} |"
            )
        lines += [
            "",
            "Pareto frontier (recall@10 up, p99 down):",
            "",
            "| method | setting | recall@10 | p99 ms |",
            "|---|---|---|---|",
        ]
        for s in r["pareto"]:
            setting = ", ".join(f"{k}={s[k]}" for k in ("ef_search", "probe_mass", "nprobe") if k in s)
            lines.append(f"| {s['method']} | {setting} | {s['recall@10']} | {s['p99_ms']} |")
    return "\n".join(lines) + "\n"


def _spectra_line(spectra: dict[str, Any]) -> list[str]:
    levels = "; ".join(
        f"{level}: variance {spectra[level]['variance']}, exponent {spectra[level]['exponent']}, "
        f"participation ratio {spectra[level]['participation_ratio']}"
        for level in LEVELS
    )
    return [f"Spectra of the real embeddings this data is drawn from (demo catalogue): {levels}.", ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[100_000])
    ap.add_argument("--categories", type=int, default=100)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--qps-queries", type=int, default=1000)
    ap.add_argument("--exact-queries", type=int, default=200, help="queries that time the exact scan")
    ap.add_argument(
        "--repeats", type=int, default=1, help="time each setting this many times (medians, and each repeat's)"
    )
    ap.add_argument("--demo", action="store_true", help="also the demo catalogue's real embeddings")
    ap.add_argument("--model", type=Path, default=Path("models/grocery-lite0-ms512"))
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--ef", type=int, nargs="*", default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--probe-mass", type=float, nargs="*", default=[0.5, 0.8, 0.9, 0.95, 0.99])
    ap.add_argument("--nprobe", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-search")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--tag", default="", help="suffix of the output files: bench_search-<tag>.json/.md")
    ap.add_argument(
        "--data",
        nargs="*",
        choices=["isotropic", "powerlaw"],
        default=["isotropic", "powerlaw"],
        help="synthetic data kinds: isotropic noise, and/or spectra fitted to the model's real embeddings",
    )
    ap.add_argument(
        "--skip", nargs="*", choices=["hnswlib", "global", "ivf"], default=[], help="baselines to leave out"
    )
    ap.add_argument("--build-only", action="store_true", help="build (and cache) the indexes, measure nothing")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)  # single-query work; parallelism comes from the 2 client threads
    args.work.mkdir(parents=True, exist_ok=True)

    results = []
    real = demo(args.model, Path("examples/grocery")) if args.demo or "powerlaw" in args.data else None
    if args.demo and real is not None:
        results.append(bench_dataset(real, args, args.work))
    for n in args.n:
        for kind in args.data:  # one data set in memory at a time (1M x 512 floats is 2 GB)
            if kind == "isotropic":
                data = synthetic(n, args.categories, args.dim, args.queries, seed=n)
            else:
                assert real is not None
                data = synthetic_powerlaw(n, args.categories, args.dim, args.queries, seed=n, spectra=real["spectra"])
            results.append(bench_dataset(data, args, args.work))
            del data
            gc.collect()
    if args.build_only:
        return
    command = "python scripts/bench_search.py " + " ".join(sys.argv[1:])
    write_report(args.out, "bench_search", args.tag, command, results, markdown(results, command))
    sys.stdout.write(markdown(results, command))


if __name__ == "__main__":
    main()
