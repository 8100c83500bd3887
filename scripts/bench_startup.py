"""Start-up to ready: what a 1M-vector index adds to `vps serve`'s start, side by side with the demo index.

    python scripts/bench_startup.py --items 1000000 --repeats 3 --out docs/bench

For each index (the demo catalogue's 486 vectors, and a synthetic one of --items vectors built once by the
service's own build code and cached under --work), with its files in the page cache ("warm") and evicted from it
("cold": posix_fadvise DONTNEED on every file, what a node sees the first time it mounts a fresh volume), starts
`vps serve` --repeats times and measures the wall time from exec to the first /readyz 200. The service's own log
lines split that time: model load, sha256 of the index files, the rest of the index load (mapping), warm-up.
Each also as a first start on the node (no verification record: every file hashed) and as a restart (the record
of the previous start kept: unchanged files are not hashed again, app/artifacts/verified.py).
The difference between the two indexes is what the index's size costs. Target (#7): start-up with a 1M-vector
index <= 2 s plus model load. Writes <out>/bench_startup.json and .md.
"""

from __future__ import annotations

import argparse
import calendar
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from benchlib import free_port, synthetic_index
from PIL import Image

from app.artifacts.manifest import resolve_current
from app.service.config import SHIPPED_MODEL_DIR

DEMO_INDEX = Path("index_data")
SCENARIOS = ("warm, first start", "cold, first start", "warm, restart", "cold, restart")
VERIFY = ("background", "before_ready")  # VPS_VERIFY_SHARDS: the default, and verifying every shard before ready


def evict(version_dir: Path) -> None:
    """Drop the index files' pages from the page cache (clean pages only: these files are read-only)."""
    for path in version_dir.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def start_once(index_dir: Path, model: Path, records: Path, log_path: Path, verify: str) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "VPS_INDEX_DIR": str(index_dir),
        "VPS_MODEL_DIR": str(model),
        "VPS_VERIFY_CACHE_DIR": str(records),
        "VPS_VERIFY_SHARDS": verify,
        "VPS_LOG_LEVEL": "INFO",
    }
    vps = str(Path(sys.executable).with_name("vps"))
    with log_path.open("wb") as log:
        t_wall, t0 = time.time(), time.perf_counter()
        server = subprocess.Popen([vps, "serve", "--port", str(port)], env=env, stderr=log, stdout=log)
        try:
            ready_s = wait_ready(server, port, t0, log_path)
            first_search_ms = search_once(port)
            wait_for_line(log_path, "index shards verified", t0)  # the background pass, or the eager one
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    logs = {}
    for line in log_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        logs[rec.get("msg")] = rec
    loaded, verified, ready = logs["index loaded"], logs["index files verified"], logs["ready"]
    shards = logs["index shards verified"]
    return {
        "wall_to_ready_s": round(ready_s, 3),
        "model_load_s": logs.get("model loaded", loaded)["model_load_s"],  # the service opens the model first
        "files_hashed": verified["hashed"],  # before ready (all files, or all but the shards)
        "verify_sha256_s": verified["verify_s"],
        "index_load_s": loaded["index_load_s"],
        "lifespan_to_ready_s": ready["startup_s"],  # model + index + warm-up, inside the process
        "first_search_ms": first_search_ms,  # right after ready: it may verify the shards it routes to
        "all_verified_s": round(log_time(shards) - t_wall, 3),  # exec to every shard hashed and loaded
    }


def wait_ready(server: subprocess.Popen[bytes], port: int, t0: float, log_path: Path) -> float:
    while time.perf_counter() - t0 < 120 and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return time.perf_counter() - t0
        except httpx.TransportError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"vps serve did not become ready; log: {log_path}")


def search_once(port: int) -> float:
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(photo, "JPEG")
    t = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/search", files={"image": ("q.jpg", photo.getvalue())}, timeout=30)
    if r.status_code != 200:
        raise SystemExit(f"the first search answered {r.status_code}: {r.text[:200]}")
    return round((time.perf_counter() - t) * 1000, 1)


def wait_for_line(log_path: Path, msg: str, t0: float) -> None:
    while time.perf_counter() - t0 < 120:
        text = log_path.read_text()
        if f'"msg": "{msg}"' in text or f'"msg":"{msg}"' in text:
            return
        time.sleep(0.02)
    raise SystemExit(f"no {msg!r} line within 120 s; log: {log_path}")


def log_time(rec: dict[str, Any]) -> float:
    stamp, ms = rec["ts"].rstrip("Z").split(".")
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


def median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(float(np.median([r[k] for r in rows])), 3) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--categories", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL_DIR, help="the demo index's model (default: shipped)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-startup")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument(
        "--verify",
        nargs="+",
        choices=VERIFY,
        default=list(VERIFY),
        help="VPS_VERIFY_SHARDS values to start with, side by side (default: both)",
    )
    ap.add_argument("--build-only", action="store_true", help="build (and cache) the large index, measure nothing")
    ap.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        metavar="SCENARIO",
        help=f"the starts to measure, any of: {'; '.join(repr(s) for s in SCENARIOS)} (default: all)",
    )
    args = ap.parse_args()
    if not (DEMO_INDEX / "CURRENT").exists():
        raise SystemExit("no demo index: run `make index_data/CURRENT` first")

    big_dir = args.work / f"index-{args.items}-{args.model.name}"  # an index holds its model's hash
    t0 = time.perf_counter()
    synthetic_index(big_dir, args.model, args.items, args.categories)
    build_s = time.perf_counter() - t0
    if args.build_only:
        return
    indexes = {"demo (486 vectors)": DEMO_INDEX, f"synthetic ({args.items:,} vectors)": big_dir}
    results: dict[str, Any] = {}
    for name, index_dir in indexes.items():
        version_dir = resolve_current(index_dir)
        size = sum(p.stat().st_size for p in version_dir.rglob("*") if p.is_file())
        entry: dict[str, Any] = {"index_mb": round(size / 2**20, 1), "runs": {}}
        records = args.work / f"verified-{index_dir.name}"
        for verify in args.verify:
            for scenario in args.scenarios:
                cache, first = scenario.split(", ")[0], scenario.endswith("first start")
                # Discarded: fills the page cache (warm) and leaves a verification record (restart).
                start_once(index_dir, args.model, records, args.work / "warm-up.log", verify)
                runs = []
                for i in range(args.repeats):
                    if first:
                        shutil.rmtree(records, ignore_errors=True)
                    if cache == "cold":
                        evict(version_dir)
                    runs.append(start_once(index_dir, args.model, records, args.work / f"serve-{i}.log", verify))
                    row = {"index": name, "scenario": scenario, "verify_shards": verify, **runs[-1]}
                    sys.stdout.write(json.dumps(row) + "\n")
                    sys.stdout.flush()
                entry["runs"][f"{scenario} · {verify}"] = {"median": median(runs), "all": runs}
        results[name] = entry

    command = "python scripts/bench_startup.py " + " ".join(sys.argv[1:])
    demo_name, big_name = list(indexes)
    added = {
        scenario: round(
            results[big_name]["runs"][scenario]["median"]["wall_to_ready_s"]
            - results[demo_name]["runs"][scenario]["median"]["wall_to_ready_s"],
            3,
        )
        for scenario in results[big_name]["runs"]
    }
    out = {
        "command": command,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "synthetic_build_s": round(build_s, 1),
        "indexes": results,
        "added_by_the_large_index_s": added,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_startup.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Start-up to ready",
        "",
        f"`{command}` — {os.cpu_count()} CPUs, Python {platform.python_version()}. Medians of {args.repeats} starts "
        "of `vps serve` (one worker); wall = exec to the first `/readyz` 200; the other columns are the service's "
        "own log lines. Cold = the index files evicted from the page cache before each start. First start = no "
        "verification record (every file hashed); restart = the previous start's record kept. `background` "
        "(VPS_VERIFY_SHARDS, the default) hashes and loads the shards after ready, each before its first search; "
        "`before_ready` all of them first. First search: one POST /search right after ready. All verified: exec "
        'to the service\'s "index shards verified" line.',
        "",
        "| index | size MB | start · shards verified | wall to ready s | model load s | files hashed before ready "
        "| verify s | index load s | lifespan to ready s | first search ms | all verified s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in results.items():
        for scenario, runs in entry["runs"].items():
            m = runs["median"]
            lines.append(
                f"| {name} | {entry['index_mb']} | {scenario} | {m['wall_to_ready_s']} | {m['model_load_s']} | "
                f"{m['files_hashed']:g} | {m['verify_sha256_s']} | {m['index_load_s']} | {m['lifespan_to_ready_s']} | "
                f"{m['first_search_ms']} | {m['all_verified_s']} |"
            )
    lines += ["", f"Added by the {args.items:,}-vector index (wall to ready, large minus demo):", ""]
    lines += [f"- {scenario}: {s} s" for scenario, s in added.items()]
    (args.out / "bench_startup.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
