"""One 16-image batch against 16 single requests, side by side, through `vps serve` on real photos.

    python scripts/bench_batch.py [--rounds 20] [--out docs/bench]

The demo catalogue's index and grocery-lite0-ms512; one worker with the service's defaults. Each round sends the
same 16 demo photos (a) as one POST /v1/search/batch, (b) as 16 POST /search one after another on one keep-alive
connection, and (c) as 16 POST /search from 4 client threads at once; the order of (a), (b), (c) rotates round
by round. Reports images per second for each (the median over rounds) and the ratios measured in the same
rounds. Writes <out>/bench_batch.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

from bench_service import demo_index  # noqa: E402
from benchlib import start_server  # noqa: E402

from app.offline.datasets.catalogue import read_catalogue  # noqa: E402

DEMO = Path("examples/grocery")
MODEL = Path("models/grocery-lite0-ms512")
BATCH = 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-service")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    rows = read_catalogue(DEMO / "queries.csv")[0]
    photos = [(DEMO / "images" / r.image).read_bytes() for r in rows[:BATCH]]
    index = demo_index(MODEL, args.work)
    env = {**os.environ, "VPS_INDEX_DIR": str(index), "VPS_MODEL_DIR": str(MODEL), "VPS_LOG_LEVEL": "WARNING"}
    server, base = start_server([], env)
    files = [("image", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)]
    times: dict[str, list[float]] = {"batch": [], "singles": [], "singles x4": []}
    try:
        with httpx.Client(base_url=base, timeout=60) as client:

            def single(p: bytes) -> None:
                r = client.post("/search", files={"image": ("q.jpg", p, "image/jpeg")}, params={"k": 10})
                r.raise_for_status()

            def batch() -> None:
                r = client.post("/v1/search/batch", files=files, params={"k": 10})
                r.raise_for_status()
                if any("error" in e for e in r.json()["results"]):
                    raise SystemExit("a batch image failed")

            def singles() -> None:
                for p in photos:
                    single(p)

            with ThreadPoolExecutor(4) as pool:

                def singles_x4() -> None:
                    list(pool.map(single, photos))

                runs = {"batch": batch, "singles": singles, "singles x4": singles_x4}
                for fn in runs.values():  # warm-up
                    fn()
                names = list(runs)
                for r in range(args.rounds):
                    for name in names[r % 3 :] + names[: r % 3]:
                        t0 = time.perf_counter()
                        runs[name]()
                        times[name].append(time.perf_counter() - t0)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    rate = {k: BATCH / float(np.median(v)) for k, v in times.items()}
    per_round = {
        k: float(np.median(np.asarray(times[k]) / np.asarray(times["batch"]))) for k in ("singles", "singles x4")
    }
    doc: dict[str, Any] = {
        "command": " ".join(["python scripts/bench_batch.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "git_commit": subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip(),
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
        "rounds": args.rounds,
        "images_per_second": {k: round(v, 1) for k, v in rate.items()},
        "batch_speedup_per_round_median": {k: round(v, 3) for k, v in per_round.items()},
        "seconds_per_16_p50": {k: round(float(np.median(v)), 4) for k, v in times.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_batch.json").write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["machine"]
    lines = [
        "# Batch search against single requests",
        "",
        f"`{doc['command']}` — {m['cpus']} CPUs (shared), Python {m['python']}, commit {m['git_commit']}, load "
        f"average {m['load_average_1m']}. `vps serve` (one worker, defaults), the demo index, grocery-lite0-ms512; "
        f"the same {BATCH} demo photos per round, {args.rounds} rounds, the three ways taking turns.",
        "",
        "| how | 16 images p50 s | images/s | batch faster by (same rounds) |",
        "|---|---|---|---|",
    ]
    for k in times:
        speed = "-" if k == "batch" else f"x{per_round[k]:.2f}"
        lines.append(f"| {k} | {doc['seconds_per_16_p50'][k]} | {doc['images_per_second'][k]} | {speed} |")
    (args.out / "bench_batch.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
