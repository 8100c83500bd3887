"""Latency of a running service's POST /search at several concurrencies, with the server's per-stage split.

    python scripts/bench_http.py --url http://127.0.0.1:8000 --queries examples/grocery/queries.csv \
        --images-root examples/grocery/images --concurrency 1 4 --requests 200 --out docs/bench

Writes <out>/bench_http.json and <out>/bench_http.md. Client-side latency includes HTTP; stage figures are the
server's own `timings_ms`. Levels run one after the other in the same process, so their ratios are comparable.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.offline.datasets.catalogue import read_catalogue

STAGES = ("decode", "embed", "route", "search", "group", "total")


def run_level(url: str, payloads: list[bytes], concurrency: int, n_requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    errors: dict[str, int] = {}
    lock = threading.Lock()
    counter = iter(range(n_requests))

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = payloads[i % len(payloads)]
                t0 = time.perf_counter()
                r = client.post(f"{url}/search", files={"image": ("q.jpg", body, "image/jpeg")}, params={"k": 10})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt * 1000)
                        for s in STAGES:
                            stages[s].append(r.json()["timings_ms"][s])
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    # Warm-up outside the measurement.
    with httpx.Client(timeout=30) as client:
        for body in payloads[:3]:
            client.post(f"{url}/search", files={"image": ("q.jpg", body, "image/jpeg")})
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(worker)
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {
        "concurrency": concurrency,
        "requests": n_requests,
        "ok": len(latencies),
        "errors": errors,
        "throughput_rps": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p95_ms": round(float(np.percentile(lat, 95)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "server_stage_mean_ms": {s: round(statistics.fmean(v), 3) for s, v in stages.items() if v},
        "server_stage_p50_ms": {s: round(float(np.percentile(v, 50)), 3) for s, v in stages.items() if v},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--queries", type=Path, default=Path("examples/grocery/queries.csv"))
    ap.add_argument("--images-root", type=Path, default=Path("examples/grocery/images"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()

    rows, _ = read_catalogue(args.queries)
    payloads = [(args.images_root / r.image).read_bytes() for r in rows]
    info = httpx.get(f"{args.url}/v1/info", timeout=10).json()
    levels = [run_level(args.url, payloads, c, args.requests) for c in args.concurrency]
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "model": info["model"]["name"],
        "index_version": info["index"]["version"],
        "index_items": info["index"]["n_items"],
        "levels": levels,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_http.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# POST /search latency ({result['model']}, {result['index_items']} images)",
        "",
        "| concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | decode | embed | route | search | group |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        st = lv["server_stage_p50_ms"]
        lines.append(
            f"| {lv['concurrency']} | {lv['throughput_rps']} | {lv['p50_ms']} | {lv['p95_ms']} | {lv['p99_ms']} | "
            f"{sum(lv['errors'].values())} | {st['decode']} | {st['embed']} | {st['route']} | {st['search']} | "
            f"{st['group']} |"
        )
    lines.append("")
    lines.append("Stage columns: the server's own p50 per stage (ms), from `timings_ms`.")
    (args.out / "bench_http.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
