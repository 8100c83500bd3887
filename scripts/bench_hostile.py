"""Decode bombs against a real `vps serve`: what each one costs the server (issue 16, classes 1-3).

    python scripts/bench_hostile.py --out docs/bench                       # this tree
    python scripts/bench_hostile.py --vps /tmp/before/.venv/bin/vps --tag before --out docs/bench

Serves the demo catalogue's index (built once into a temp dir with the given `vps`), then per case: the answer,
wall time, the server's CPU seconds and its peak RSS rise (psutil, sampled every 10 ms), and the bytes it wrote
to its log. Then a hostile batch (every bomb three times at once) and the RSS after it against the baseline, and
whether ordinary searches were answered meanwhile. Writes <out>/bench_hostile-<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.hostile import animated_webp, exif_warning_jpeg, scan_bomb, sixteen_bit_png  # noqa: E402

DEMO = ROOT / "examples" / "grocery"
MODEL = ROOT / "models" / "grocery-lite0-ms512"
ORDINARY = (DEMO / "images" / "val" / "Fruit" / "Avocado" / "Avocado_001.jpg").read_bytes()

CASES: dict[str, Callable[[], bytes]] = {
    "progressive JPEG 6000x6000, one scan repeated 1,000 times": lambda: scan_bomb(6000, 6000, 1000, flat=True),
    "16-bit grey PNG 6300x6300": lambda: sixteen_bit_png(6300, 6300),
    "animated WebP, 6300x6300 canvas": lambda: animated_webp(6300, 6300),
    "JPEG with 5,400 bogus EXIF tags": lambda: exif_warning_jpeg(5400),
    # The largest of each kind the limits let through: what an accepted request may cost.
    "accepted: progressive JPEG 7000x5700, 64 scans": lambda: scan_bomb(7000, 5700, 54, flat=True),
    "accepted: 16-bit grey PNG 5000x5000": lambda: sixteen_bit_png(5000, 5000),
    "accepted: animated WebP, 3000x3000 canvas": lambda: animated_webp(3000, 3000),
}


class Sampler:
    """Peak RSS of a process, sampled every 10 ms while running."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc, self.peak, self._stop = proc, proc.memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def _post(base: str, data: bytes, timeout: float = 120) -> tuple[int, str]:
    try:
        r = httpx.post(f"{base}/search", content=data, timeout=timeout)
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    code = r.json().get("error", {}).get("code", "") if r.status_code != 200 else ""
    return r.status_code, code


def one_case(base: str, proc: psutil.Process, log: Path, data: bytes) -> dict[str, Any]:
    time.sleep(0.3)
    rss0, cpu0, log0 = proc.memory_info().rss, _cpu(proc), log.stat().st_size
    sampler = Sampler(proc)
    t0 = time.perf_counter()
    status, code = _post(base, data)
    wall = time.perf_counter() - t0
    time.sleep(0.2)
    peak = sampler.stop()
    return {
        "bytes": len(data),
        "status": status,
        "code": code,
        "wall_s": round(wall, 3),
        "server_cpu_s": round(_cpu(proc) - cpu0, 3),
        "rss_rise_mb": round((peak - rss0) / 2**20, 1),
        "log_bytes": log.stat().st_size - log0,
    }


def hostile_batch(base: str, proc: psutil.Process, payloads: list[bytes], baseline: int) -> dict[str, Any]:
    """Every bomb three times at once, with an ordinary search every 200 ms beside them."""
    sampler = Sampler(proc)
    ordinary: list[int] = []
    done = threading.Event()

    def ask_ordinary() -> None:
        while not done.is_set():
            ordinary.append(_post(base, ORDINARY, timeout=30)[0])
            time.sleep(0.2)

    side = threading.Thread(target=ask_ordinary, daemon=True)
    side.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(payloads) * 3) as pool:
        answers = list(pool.map(lambda d: _post(base, d), payloads * 3))
    wall = time.perf_counter() - t0
    done.set()
    side.join(35)
    peak = sampler.stop()
    time.sleep(2.0)
    after = proc.memory_info().rss
    return {
        "requests": len(answers),
        "answers": sorted({f"{s} {c}".strip() for s, c in answers}),
        "wall_s": round(wall, 2),
        "ordinary_searches": len(ordinary),
        "ordinary_answered_200": sum(1 for s in ordinary if s == 200),
        "rss_baseline_mb": round(baseline / 2**20, 1),
        "rss_peak_mb": round(peak / 2**20, 1),
        "rss_after_mb": round(after / 2**20, 1),
        "rss_after_vs_baseline": round(after / baseline, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vps", default=str(Path(sys.executable).with_name("vps")))
    ap.add_argument("--tag", default="after")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vps-hostile-"))
    subprocess.run(
        [
            args.vps,
            "build-index",
            "--catalogue",
            str(DEMO / "catalogue.csv"),
            "--images-root",
            str(DEMO / "images"),
            "--out",
            str(work / "index"),
            "--model",
            str(MODEL),
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchlib import start_server

    log = work / "server.log"
    env = {**os.environ, "VPS_INDEX_DIR": str(work / "index"), "VPS_MODEL_DIR": str(MODEL), "VPS_LOG_LEVEL": "INFO"}
    with log.open("wb") as fh:
        server, base = start_server([], env, vps=args.vps, log=fh)
    try:
        proc = psutil.Process(server.pid)
        for _ in range(5):
            _post(base, ORDINARY)
        time.sleep(1.0)
        baseline = proc.memory_info().rss
        payloads = {name: make() for name, make in CASES.items()}
        cases = {name: one_case(base, proc, log, data) for name, data in payloads.items()}
        batch = hostile_batch(base, proc, list(payloads.values()), baseline)
    finally:
        server.terminate()
        server.wait(30)
    result = {"tag": args.tag, "vps": args.vps, "cases": cases, "hostile_batch": batch}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_hostile-{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        "| case | bytes | answer | wall s | server CPU s | RSS rise MB | log bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| {n} | {c['bytes']:,} | {c['status']} {c['code']} | {c['wall_s']} | {c['server_cpu_s']} | "
        f"{c['rss_rise_mb']} | {c['log_bytes']:,} |"
        for n, c in cases.items()
    ]
    b = batch
    rows += [
        "",
        f"Hostile batch ({b['requests']} at once: every case three times): answers {', '.join(b['answers'])}; "
        f"{b['wall_s']} s; ordinary searches beside it {b['ordinary_answered_200']}/{b['ordinary_searches']} "
        f"answered 200; RSS baseline {b['rss_baseline_mb']} MB, peak {b['rss_peak_mb']} MB, "
        f"after {b['rss_after_mb']} MB ({b['rss_after_vs_baseline']}x baseline).",
    ]
    (args.out / f"bench_hostile-{args.tag}.md").write_text(
        f"`python scripts/bench_hostile.py --tag {args.tag}` (demo index, 2 shared cores)\n\n" + "\n".join(rows) + "\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
