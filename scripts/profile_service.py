"""Where the service's own CPU goes: a CPU-clock profile of every thread of a server under load (issue #21).

    python scripts/profile_service.py --seconds 10 --concurrency 4 --out docs/bench

The app (the demo index, default settings) runs under uvicorn in this process with yappi's CPU clock on every
thread; a keep-alive client posts the demo photos for `--seconds` (closed loop, after a warm-up). Each function's
own time is charged to a layer by the file it lives in: HTTP (uvicorn, Starlette, FastAPI, python-multipart,
asyncio and the thread-pool hand-off, Prometheus, our service code) or the pipeline (our engine and artifacts,
ONNX Runtime, faiss, Pillow, numpy). The client's own frames are left out. The HTTP layers are what this is for:
native work done with the GIL released (ONNX Runtime's kernels) is mostly not seen here, so the pipeline figure
is a floor, and the profiler slows Python code, so the HTTP figures are a ceiling. The service's CPU a request by
/proc is `bench_service.py`'s.
Writes <out>/profile_service.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import uvicorn  # noqa: E402
import yappi  # noqa: E402
from bench_service import DEMO, closed_loop, demo_index  # noqa: E402
from benchlib import encode_search, free_port, keepalive_caller  # noqa: E402

from app.offline.datasets.catalogue import read_catalogue  # noqa: E402
from app.service.app import create_app  # noqa: E402
from app.service.config import Settings  # noqa: E402

# (layer, substring of the file path), first match wins.
LAYERS = [
    ("client (not counted)", "/scripts/"),
    ("HTTP: uvicorn", "/uvicorn/"),
    ("HTTP: httptools/h11", "/httptools/"),
    ("HTTP: FastAPI", "/fastapi/"),
    ("HTTP: Starlette", "/starlette/"),
    ("HTTP: python-multipart", "/python_multipart/"),
    ("HTTP: pydantic", "/pydantic"),
    ("HTTP: prometheus_client", "/prometheus_client/"),
    ("HTTP: our service code (app/service)", "/app/service/"),
    ("HTTP: asyncio, futures, threads, logging", "/asyncio/"),
    ("HTTP: asyncio, futures, threads, logging", "/concurrent/"),
    ("HTTP: asyncio, futures, threads, logging", "/threading.py"),
    ("HTTP: asyncio, futures, threads, logging", "/logging/"),
    ("pipeline: our engine and artifacts", "/app/engine/"),
    ("pipeline: our engine and artifacts", "/app/artifacts/"),
    ("pipeline: ONNX Runtime", "/onnxruntime/"),
    ("pipeline: faiss", "/faiss/"),
    ("pipeline: Pillow", "/PIL/"),
    ("pipeline: numpy", "/numpy/"),
    ("pipeline: json (item rows)", "/json/"),
]


def layer_of(path: str) -> str:
    return next((name for name, part in LAYERS if part in path), "other")


def profile(seconds: float, concurrency: int) -> tuple[Counter[str], int, dict[str, float]]:
    rows = read_catalogue(DEMO / "queries.csv")[0] + read_catalogue(DEMO / "calibration.csv")[0]
    payloads = [(DEMO / "images" / r.image).read_bytes() for r in rows]
    model = Path("models/grocery-lite0-ms512")
    index = demo_index(model, Path(tempfile.gettempdir()) / "vps-bench-service")  # bench_service.py's cache
    app = create_app(Settings(index_dir=index, model_dir=model, max_inflight=64, log_level="WARNING"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        call = keepalive_caller(port, {id(p): encode_search("127.0.0.1", p, "?k=10") for p in payloads})
        closed_loop(call, payloads, concurrency, 2)  # warm-up, not profiled
        yappi.set_clock_type("cpu")
        yappi.start(builtins=False)
        result = closed_loop(call, payloads, concurrency, seconds, warm_up=False)
        yappi.stop()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    by_layer: Counter[str] = Counter()
    for stat in yappi.get_func_stats():
        by_layer[layer_of(stat.module)] += stat.tsub
    n = len(result["lat"])
    return by_layer, n, {"elapsed_s": result["elapsed"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    by_layer, n, extra = profile(args.seconds, args.concurrency)
    per_request = {k: round(1000 * v / n, 3) for k, v in by_layer.most_common() if not k.startswith("client")}
    http = round(sum(v for k, v in per_request.items() if k.startswith("HTTP")), 3)
    pipeline = round(sum(v for k, v in per_request.items() if k.startswith("pipeline")), 3)
    command = "python scripts/profile_service.py " + " ".join(sys.argv[1:])
    out: dict[str, Any] = {
        "command": command,
        "requests": n,
        **extra,
        "own_cpu_ms_per_request": per_request,
        "http_ms": http,
        "pipeline_ms": pipeline,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_service.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Where the service's own CPU goes (yappi, CPU clock, every thread)",
        "",
        f"`{command}`: {n} `POST /search` requests on the demo index at concurrency {args.concurrency}. Own time a "
        "request by layer. Native work with the GIL released (ONNX Runtime's kernels) is mostly not seen, so the "
        "pipeline figure is a floor; the profiler slows Python code, so the HTTP figures are a ceiling.",
        "",
        "| layer | own CPU ms a request |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in per_request.items()],
        f"| **HTTP layers in all** | **{http}** |",
        f"| **pipeline in all** | **{pipeline}** |",
    ]
    (args.out / "profile_service.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
