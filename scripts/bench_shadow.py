"""What shadow recall costs: `vps serve` with VPS_SHADOW_SAMPLE 0 (off), the default and 1.0, side by side in one run.

    python scripts/bench_shadow.py --seconds 6 --rounds 3 --out docs/bench

The three servers (demo index, default settings but for the sample rate and admission, one worker each) run at
once; a lean keep-alive client drives one of them at a time in a closed loop at each --concurrency, in short
interleaved rounds whose variant order rotates, so a slow minute on a shared machine hits every variant. Reports
throughput and p50/p99 per variant, throughput against "off" (median of the rounds' ratios), and what each
server's shadow counted (/metrics). In process, the same photos' routed search and every-shard search
(`search_vector`, what a shadow sample costs its thread) against the whole `search_image`.
Writes <out>/bench_shadow.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

# Same thread discipline as `vps serve`, before numpy's and onnxruntime's pools start.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from bench_service import DEMO, closed_loop, demo_index, rate, summarise  # noqa: E402
from benchlib import encode_search, keepalive_caller, start_server  # noqa: E402

from app.engine.search import SearchParams  # noqa: E402
from app.offline.datasets.catalogue import read_catalogue  # noqa: E402
from app.service.config import Settings  # noqa: E402
from app.service.engines import load_engine  # noqa: E402

MODEL = Path("models/grocery-lite0-ms512")
SHADOW = ("same", "top1_missed", "topk_missed")


def shadow_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics").text

    def value(sample: str) -> float:
        m = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0  # a labelled series appears with its first event

    counts = {o: value(f'vps_routing_shadow_total{{outcome="{o}"}}') for o in SHADOW}
    counts["dropped"] = value("vps_routing_shadow_dropped_total")
    counts["errors"] = value("vps_routing_shadow_errors_total")
    counts["searches"] = value('vps_requests_total{route="/search",status="200"}')
    return counts


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children (the shadow thread's work included)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    return sum(t.user + t.system for t in (p.cpu_times() for p in procs))


def in_process_costs(index: Path, payloads: list[bytes], repeats: int, routing: SearchParams) -> dict[str, Any]:
    """Per photo, median ms of: the whole routed search_image, its routed search_vector alone, and the every-shard
    search_vector a shadow sample runs; how many shards the routed search probes; the top scores."""
    engine = load_engine(Settings(index_dir=index, model_dir=MODEL))
    params = replace(routing, k=10)
    every = replace(params, probe_mass=1.0, max_probes=len(engine.shards))
    full, routed, exhaustive, probed, top = [], [], [], [], []
    for data in payloads:
        for _ in range(repeats):
            t0 = time.perf_counter()
            outcome = engine.search_image(data, params)
            t1 = time.perf_counter()
            assert outcome.vector is not None
            engine.search_vector(outcome.vector, params)
            t2 = time.perf_counter()
            engine.search_vector(outcome.vector, every)
            t3 = time.perf_counter()
            full.append(t1 - t0)
            routed.append(t2 - t1)
            exhaustive.append(t3 - t2)
        probed.append(len(outcome.probes) + len(outcome.added))
        top.append(outcome.results[0].score)

    def ms(xs: list[float]) -> float:
        return round(float(np.median(xs)) * 1000, 3)

    return {
        "shards": len(engine.shards),
        "manifest_probe_mass": engine.manifest.probe_mass,
        "manifest_max_probes": engine.manifest.max_probes,
        "mean_shards_routed": round(float(np.mean(probed)), 2),
        "search_image_ms": ms(full),
        "routed_search_vector_ms": ms(routed),
        "every_shard_search_vector_ms": ms(exhaustive),
        "top_score_p5_p50_p95": [round(float(q), 3) for q in np.percentile(top, [5, 50, 95])],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6, help="per variant and concurrency, split into --rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--samples", type=float, nargs="*", default=None, help="default: 0, the default rate, 1")
    # The demo's manifest probes every shard (its build searches an index of <= 1,000 vectors whole), and a search
    # that covered every shard has no shadow: route as a large catalogue would, for every variant alike.
    ap.add_argument("--probe-mass", type=float, default=0.9, help="VPS_PROBE_MASS of every variant")
    ap.add_argument("--max-probes", type=int, default=3, help="VPS_MAX_PROBES of every variant")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-service")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    default_rate = float(Settings.model_fields["shadow_sample"].default)
    samples = args.samples if args.samples is not None else [0.0, default_rate, 1.0]
    rows = read_catalogue(DEMO / "queries.csv")[0] + read_catalogue(DEMO / "calibration.csv")[0]
    payloads = [(DEMO / "images" / r.image).read_bytes() for r in rows]
    index = demo_index(MODEL, args.work)
    encoded = {id(p): encode_search("127.0.0.1", p, "?k=10") for p in payloads}

    load_before = os.getloadavg()[0]  # the machine is shared: say how busy it was
    servers: list[tuple[float, Any, str]] = []
    try:
        for sample in samples:
            env = {
                **os.environ,
                "VPS_INDEX_DIR": str(index),
                "VPS_MODEL_DIR": str(MODEL),
                "VPS_SHADOW_SAMPLE": str(sample),
                "VPS_PROBE_MASS": str(args.probe_mass),
                "VPS_MAX_PROBES": str(args.max_probes),
                "VPS_MAX_INFLIGHT": "64",  # a closed loop above the pool queues instead of being refused
                "VPS_LOG_LEVEL": "WARNING",
            }
            proc, base = start_server([], env)
            servers.append((sample, proc, base))
        callers = {s: keepalive_caller(int(base.rsplit(":", 1)[1]), encoded) for s, _, base in servers}
        before = {s: shadow_counts(base) for s, _, base in servers}
        results: dict[float, list[dict[str, Any]]] = {s: [] for s in samples}
        pids = {s: proc.pid for s, proc, _ in servers}
        for c in args.concurrency:
            rounds: dict[float, list[dict[str, Any]]] = {s: [] for s in samples}
            cpu = {s: [0.0, 0] for s in samples}  # server CPU seconds, requests (warm-up included)
            for r in range(args.rounds):
                for s in samples[r % len(samples) :] + samples[: r % len(samples)]:
                    t0 = cpu_s(pids[s])
                    rounds[s].append(closed_loop(callers[s], payloads, c, args.seconds / args.rounds))
                    cpu[s][0] += cpu_s(pids[s]) - t0
                    cpu[s][1] += len(rounds[s][-1]["lat"]) + min(4, len(payloads))
            for s in samples:
                ratios = [rate(x) / rate(o) for x, o in zip(rounds[s], rounds[samples[0]], strict=True)]
                results[s].append(
                    {
                        **summarise(rounds[s], c),
                        "ratio_to_first": round(float(np.median(ratios)), 3),
                        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
                        # Less noisy than throughput on a shared machine: the server's own CPU per request.
                        "server_cpu_ms_per_request": round(cpu[s][0] / cpu[s][1] * 1000, 3),
                    }
                )
        # The shadow thread may still be draining its queue: wait for it (bounded) before reading the counts.
        deadline = time.monotonic() + 30
        after = {s: shadow_counts(base) for s, _, base in servers}
        while time.monotonic() < deadline:
            time.sleep(0.5)
            again = {s: shadow_counts(base) for s, _, base in servers}
            if again == after:
                break
            after = again
    finally:
        for _, proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
        for _, proc, _ in servers:
            proc.wait(timeout=60)

    routing = SearchParams(probe_mass=args.probe_mass, max_probes=args.max_probes)
    costs = in_process_costs(index, payloads, 3, routing)
    out = []
    for s in samples:
        counted = {k: after[s][k] - before[s][k] for k in after[s]}
        out.append({"shadow_sample": s, "rows": results[s], "shadow": counted})
    command = "python scripts/bench_shadow.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    doc = {"command": command, "load_average_1m_before_after": load, "in_process": costs, "results": out}
    (args.out / "bench_shadow.json").write_text(json.dumps(doc, indent=2) + "\n")

    lines = [
        "# Shadow recall: its cost at 0, the default rate and 1.0",
        "",
        f"`{command}` — {os.cpu_count()} CPUs, Python {platform.python_version()}; {len(payloads)} real photos "
        f"(the demo's val and calibration photos), demo index routed with probe_mass {args.probe_mass} and "
        f"max_probes {args.max_probes}, `vps serve` with one worker, pool 3, VPS_MAX_INFLIGHT 64; closed loop, the "
        "client shares the cores; the servers run side by side, driven one at a time in rotating interleaved rounds. "
        f"1-minute load average {load[0]} before, {load[1]} after.",
        "",
        "| VPS_SHADOW_SAMPLE | concurrency | requests | /s | p50 ms | p99 ms | /s vs 0 (median of rounds; range) "
        "| server CPU ms / request |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out:
        for row in r["rows"]:
            lines.append(
                f"| {r['shadow_sample']} | {row['concurrency']} | {row['requests']} | {row['per_s']} | "
                f"{row['p50_ms']} | {row['p99_ms']} | {row['ratio_to_first']} "
                f"({row['ratio_min_max'][0]}-{row['ratio_min_max'][1]}) | {row['server_cpu_ms_per_request']} |"
            )
    lines += [
        "",
        "What each server's shadow counted over the run (warm-up included):",
        "",
        "| VPS_SHADOW_SAMPLE | searches | same | top1_missed | topk_missed | dropped (queue full) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out:
        c = r["shadow"]
        lines.append(
            f"| {r['shadow_sample']} | {c['searches']:.0f} | {c['same']:.0f} | {c['top1_missed']:.0f} | "
            f"{c['topk_missed']:.0f} | {c['dropped']:.0f} | {c['errors']:.0f} |"
        )
    lines += [
        "",
        f"In process, median per photo ({costs['shards']} shards, {costs['mean_shards_routed']} searched on average "
        f"when routed, fill included; the manifest's own probe_mass {costs['manifest_probe_mass']}, max_probes "
        f"{costs['manifest_max_probes']}); top result's score p5/p50/p95 {costs['top_score_p5_p50_p95']}:",
        "",
        "| search_image, routed (whole path) ms | routed search_vector ms | every-shard search_vector (a shadow) ms |",
        "|---|---|---|",
        f"| {costs['search_image_ms']} | {costs['routed_search_vector_ms']} "
        f"| {costs['every_shard_search_vector_ms']} |",
    ]
    (args.out / "bench_shadow.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
