"""Memory of `vps serve --workers N` on a large index: is the index shared by the workers or copied into each?

    python scripts/bench_workers.py --items 200000 --workers 2 --out docs/bench

Builds (once, cached under --work) an index of synthetic unit vectors for the served model's dimension: --items
vectors in --categories categories, 5 per SKU, clustered so that the router has work to do. Starts `vps serve
--workers N` on it, sends searches (routed, then every shard probed), and reads per worker, from /proc:
USS (private memory: what one more worker costs), PSS, RSS, and for the index files' own mappings their resident
and private bytes. Writes <out>/bench_workers.json and <out>/bench_workers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from benchlib import start_server, synthetic_index

from app.offline.datasets.catalogue import read_catalogue

MB = 1024 * 1024


def smaps(pid: int, under: Path) -> dict[str, float]:
    """Sum /proc/<pid>/smaps fields over the mappings of files under `under`."""
    fields = {"Rss": 0, "Pss": 0, "Shared_Clean": 0, "Private_Clean": 0, "Private_Dirty": 0}
    inside = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        parts = line.split()
        if parts and "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
            inside = len(parts) >= 6 and parts[5].startswith(str(under))
        elif inside and parts[0].rstrip(":") in fields:
            fields[parts[0].rstrip(":")] += int(parts[1]) * 1024
    return {k: round(v / MB, 1) for k, v in fields.items()}


def measure(workers: list[psutil.Process], version_dir: Path) -> list[dict[str, Any]]:
    out = []
    for w in workers:
        info = w.memory_full_info()
        out.append(
            {
                "pid": w.pid,
                "uss_mb": round(info.uss / MB, 1),
                "pss_mb": round(info.pss / MB, 1),
                "rss_mb": round(info.rss / MB, 1),
                "index_mappings_mb": smaps(w.pid, version_dir),
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--categories", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", type=Path, default=Path("models/grocery-lite0-ms512"))
    ap.add_argument("--queries", type=Path, default=Path("examples/grocery/queries.csv"))
    ap.add_argument("--images-root", type=Path, default=Path("examples/grocery/images"))
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/vps-bench-workers"))  # noqa: S108 - scratch space
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()

    t0 = time.perf_counter()
    index_dir = args.work / f"index-{args.items}"
    version_dir = synthetic_index(index_dir, args.model, args.items, args.categories)
    build_s = time.perf_counter() - t0
    index_bytes = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file())
    shard_bytes = sum(p.stat().st_size for p in (version_dir / "shards").iterdir())

    payloads = [(args.images_root / r.image).read_bytes() for r in read_catalogue(args.queries)[0]]
    env = {
        **os.environ,
        "VPS_INDEX_DIR": str(index_dir),
        "VPS_MODEL_DIR": str(args.model),
        "VPS_LOG_LEVEL": "WARNING",
        "PROMETHEUS_MULTIPROC_DIR": str(args.work / "metrics"),
    }
    t_start = time.perf_counter()
    server, base = start_server(["--workers", str(args.workers)], env)
    phases: dict[str, list[dict[str, Any]]] = {}
    try:
        parent = psutil.Process(server.pid)
        deadline = time.monotonic() + 120
        while True:
            workers = [c for c in parent.children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
            # A worker is up once its index is loaded: it has then written its live gauges.
            ready = len(workers) == args.workers and all(
                (args.work / "metrics" / f"gauge_livemostrecent_{w.pid}.db").exists() for w in workers
            )
            if ready or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        ready_s = time.perf_counter() - t_start
        time.sleep(1.0)
        phases["started"] = measure(workers, version_dir)
        with httpx.Client(timeout=60, headers={"Connection": "close"}) as client:
            for i in range(args.requests):
                r = client.post(f"{base}/search", files={"image": payloads[i % len(payloads)]})
                r.raise_for_status()
            phases["after routed searches"] = measure(workers, version_dir)
            for i in range(args.requests):
                r = client.post(
                    f"{base}/search",
                    files={"image": payloads[i % len(payloads)]},
                    params={"probe_mass": 1.0, "max_probes": 1000},
                )
                r.raise_for_status()
            phases["after searches of every shard"] = measure(workers, version_dir)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)

    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "items": args.items,
        "categories": args.categories,
        "workers": args.workers,
        "index_bytes_mb": round(index_bytes / MB, 1),
        "shard_bytes_mb": round(shard_bytes / MB, 1),
        "build_s": round(build_s, 1),
        "start_to_all_ready_s": round(ready_s, 2),
        "phases": phases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_workers.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# `vps serve --workers {args.workers}` memory, {args.items:,}-vector index",
        "",
        f"Index on disk: {result['index_bytes_mb']} MB (shards {result['shard_bytes_mb']} MB). "
        f"Command: `python scripts/{result['command']}`. {os.cpu_count()} CPUs.",
        "",
        "| phase | worker | USS MB | PSS MB | RSS MB | index mapped, resident MB | of it private MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, rows in phases.items():
        for i, row in enumerate(rows):
            m = row["index_mappings_mb"]
            private = round(m["Private_Clean"] + m["Private_Dirty"], 1)
            lines.append(
                f"| {phase} | {i + 1} | {row['uss_mb']} | {row['pss_mb']} | {row['rss_mb']} | {m['Rss']} | {private} |"
            )
    (args.out / "bench_workers.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
