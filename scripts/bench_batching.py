"""Micro-batching against one-by-one inference, over HTTP, side by side in one run (issue #21, item 2).

    python scripts/bench_batching.py --seconds 12 --rounds 4 --concurrency 1 4 8 --out docs/bench

Every configuration is a `vps serve` of the demo catalogue's index, all started at once; for each concurrency the
rounds interleave the configurations (off, on, off, on, ...), so a noisy minute on a shared machine hits them
alike (each round starting with another), and each configuration's requests/s is compared with the first's
(the default: micro-batching off) round by round.
The client runs on the same cores (closed loop, keep-alive). Writes <out>/bench_batching.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from bench_service import DEMO, cpu_round, demo_index, process_cpu_s, rate, summarise  # noqa: E402
from benchlib import encode_search, keepalive_caller, start_server  # noqa: E402

from app.offline.datasets.catalogue import read_catalogue  # noqa: E402

# A request waits on a pool thread, so a micro-batch holds at most `pool` images: pool 6 lets more meet.
CONFIGS = [
    {"name": "off (default): pool 3, intra 1", "window_ms": 0, "intra": 1, "pool": 3},
    {"name": "window 2 ms: pool 3, intra 1", "window_ms": 2, "intra": 1, "pool": 3},
    {"name": "window 5 ms: pool 3, intra 1", "window_ms": 5, "intra": 1, "pool": 3},
    {"name": "off: pool 3, intra 2", "window_ms": 0, "intra": 2, "pool": 3},
    {"name": "window 2 ms: pool 3, intra 2", "window_ms": 2, "intra": 2, "pool": 3},
    {"name": "off: pool 6, intra 1", "window_ms": 0, "intra": 1, "pool": 6},
    {"name": "window 5 ms: pool 6, intra 1", "window_ms": 5, "intra": 1, "pool": 6},
]


def _env(cfg: dict[str, Any], index: Path, model: str) -> dict[str, str]:
    return {
        **os.environ,
        "VPS_INDEX_DIR": str(index),
        "VPS_MODEL_DIR": model,
        "VPS_ORT_INTRA_OP_THREADS": str(cfg["intra"]),
        "VPS_POOL_THREADS": str(cfg["pool"]),
        "VPS_MAX_INFLIGHT": "64",
        "VPS_MICRO_BATCH_WINDOW_MS": str(cfg["window_ms"]),
        "VPS_LOG_LEVEL": "WARNING",
    }


def measure(configs: list[dict[str, Any]], payloads: list[bytes], args: argparse.Namespace) -> list[dict[str, Any]]:
    index = demo_index(Path(args.model), args.work)
    servers = [start_server([], _env(cfg, index, args.model)) for cfg in configs]
    try:
        callers, cpus = [], []
        for server, base in servers:
            encoded = {id(p): encode_search("127.0.0.1", p, "?k=10") for p in payloads}
            callers.append(keepalive_caller(int(base.rsplit(":", 1)[1]), encoded))
            cpus.append(partial(process_cpu_s, psutil.Process(server.pid)))
        results: list[dict[str, Any]] = [{**cfg, "http": []} for cfg in configs]
        for c in args.concurrency:
            rounds: list[list[dict[str, Any]]] = [[] for _ in configs]
            for r in range(args.rounds):
                for i in np.roll(np.arange(len(configs)), r):  # each round starts with another configuration
                    rounds[i].append(cpu_round(cpus[i], callers[i], payloads, c, args.seconds / args.rounds))
            for i, res in enumerate(results):
                ratios = [rate(r) / rate(base) for r, base in zip(rounds[i], rounds[0], strict=True)]
                res["http"].append(
                    {
                        **summarise(rounds[i], c),
                        "ratio_to_off": round(float(np.median(ratios)), 3),
                        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
                    }
                )
    finally:
        for server, _ in servers:
            server.send_signal(signal.SIGTERM)
        for server, _ in servers:
            server.wait(timeout=60)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12, help="per configuration and concurrency, in --rounds")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--model", default="models/grocery-lite0-ms512")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-service")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    rows = read_catalogue(DEMO / "queries.csv")[0] + read_catalogue(DEMO / "calibration.csv")[0]
    payloads = [(DEMO / "images" / r.image).read_bytes() for r in rows]
    results = measure(CONFIGS, payloads, args)
    command = "python scripts/bench_batching.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_batching.json").write_text(
        json.dumps({"command": command, "model": args.model, "results": results}, indent=2) + "\n"
    )
    lines = [
        "# Micro-batching against one-by-one inference (HTTP)",
        "",
        f"`{command}` — {os.cpu_count()} CPUs, Python {platform.python_version()}; model {args.model}; "
        f"{len(payloads)} real photos, demo index, closed loop, the client on the same cores; configurations "
        "interleaved round by round.",
        "",
        "| configuration | concurrency | requests/s | p50 ms | p99 ms | requests/s against the default (median of "
        "rounds; min-max) | server CPU ms a request |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for h in r["http"]:
            lines.append(
                f"| {r['name']} | {h['concurrency']} | {h['per_s']} | {h['p50_ms']} | {h['p99_ms']} | "
                f"{h['ratio_to_off']} ({h['ratio_min_max'][0]}-{h['ratio_min_max'][1]}) | "
                f"{h.get('cpu_ms_per_request', '-')} |"
            )
    (args.out / "bench_batching.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
