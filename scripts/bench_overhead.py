"""The service's own CPU a request, with the pipeline taken out (issue #21, item 1).

    python scripts/bench_overhead.py --seconds 2 --rounds 8 --out docs/bench

`bench_service.py` compares the server's CPU a request with the in-process pipeline's; the difference is a few
per cent of a 10-12 ms search, and on this shared machine the pipeline's own CPU moves by more than that between
rounds. Here each server answers every search from a memo of the real answer for that photo (computed once, on
its first request), so what the server spends a request is what HTTP and the service add: the protocol, the
request id and access-log line, metrics, query validation, the multipart parse, admission and the hand-off to the
compute pool, the response model and its JSON. Everything else is the real service: `create_app` with its
settings, uvicorn with `LimitedHttpProtocol`, JSON logs at INFO (to /dev/null). The shadow sampler keeps its
default; on the demo index every search probes every shard already, so it never searches again.

Three servers run side by side, in alternating rounds on the same photos: the service as it is (POST /search on
its plain ASGI lane, `ServiceApp`); the same app with the lane removed, so the request takes FastAPI's router and
Starlette's middleware stack; and a floor, a bare ASGI app under the same protocol that reads the body, hops to a
thread pool and back and sends a canned answer of the same size (what no Python service here can go below).
CPU is the server process's (psutil, user + system) over each round; the client is
this process, on the same cores. Many short rounds, because this machine's neighbours come and go: the minimum
is the round least disturbed by them. Writes <out>/bench_overhead.json and .md.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
from bench_service import DEMO, cpu_round, demo_index, process_cpu_s, rate  # noqa: E402
from benchlib import encode_search, free_port, keepalive_caller, wait_ready, write_report  # noqa: E402
from PIL import Image  # noqa: E402

from app.engine.embedding import Embedder  # noqa: E402
from app.engine.imaging import Collected  # noqa: E402
from app.engine.search import SearchEngine, SearchOutcome, SearchParams  # noqa: E402
from app.offline.datasets.catalogue import read_catalogue  # noqa: E402
from app.service.config import SHIPPED_MODEL_DIR, Settings  # noqa: E402

PATHS = {
    "lane": "plain lane (the service)",
    "fastapi": "FastAPI router (lane removed)",
    "floor": "floor: bare ASGI app (body read, pool hop, canned JSON)",
}


def memo_loader(settings: Settings, embedder: Embedder | None = None) -> SearchEngine:
    """The real engine, its `search_image` answering each photo from a memo of its real answer. The key is the
    photo's length and its first and last bytes: hashing 100-300 kB would itself cost the server ~0.1 ms."""
    from app.service.engines import load_engine

    engine = load_engine(settings, embedder)
    real = engine.search_image
    answers: dict[tuple[int, bytes, bytes], SearchOutcome] = {}

    def search_image(data: bytes, params: SearchParams, warnings: Collected | None = None) -> SearchOutcome:
        key = (len(data), data[:256], data[-256:])
        if key not in answers:
            answers[key] = real(data, params, warnings)
        return answers[key]

    engine.search_image = search_image  # type: ignore[method-assign]
    return engine


def floor_app(body: bytes) -> Any:
    """What any Python service on this server pays: uvicorn, the body read, a hop to a thread pool and back, a
    canned JSON answer of the service's size. No request id, log line, metrics, parsing or response building."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(3)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        await asyncio.get_running_loop().run_in_executor(pool, len, data)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def serve(port: int, path: str) -> None:
    """Server mode (a child process): the app on the memo engine, served as `vps serve` serves it."""
    import uvicorn

    from app.service.app import create_app
    from app.service.logs import configure_logging
    from app.service.server import LimitedHttpProtocol

    settings = Settings()
    configure_logging(settings.log_level)
    app: Any = create_app(settings, loader=memo_loader)
    if path == "fastapi":
        app.lanes.clear()
    if path == "floor":
        app = floor_app(b'{"results": "' + b"x" * 4000 + b'"}')
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http=LimitedHttpProtocol,
        log_config=None,
        access_log=False,
        limit_concurrency=None,
    )


def start(path: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve-on", str(port), "--path", path]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(server, f"http://127.0.0.1:{port}", what=f"the {path} server")  # the floor answers 200 to any GET
    return server, port


def measure(args: argparse.Namespace, payloads: list[bytes], env: dict[str, str]) -> list[dict[str, Any]]:
    servers = [start(path, env) for path in PATHS]
    try:
        callers = []
        for _, port in servers:
            encoded = {id(p): encode_search("127.0.0.1", p, "?k=10") for p in payloads}
            call = keepalive_caller(port, encoded)
            for p in payloads:  # every photo's real answer into the memo before anything is counted
                call(p)
            callers.append(call)
        rows = []
        for c in args.concurrency:
            rounds: list[list[dict[str, Any]]] = [[] for _ in PATHS]
            for _ in range(args.rounds):
                for i, ((proc, _), call) in enumerate(zip(servers, callers, strict=True)):
                    p = psutil.Process(proc.pid)
                    rounds[i].append(cpu_round(partial(process_cpu_s, p), call, payloads, c, args.seconds))
            for name, rs in zip(PATHS.values(), rounds, strict=True):
                per = [1000 * r["cpu_s"] / len(r["lat"]) for r in rs]
                lat = [v for r in rs for v in r["lat"]]
                rows.append(
                    {
                        "path": name,
                        "concurrency": c,
                        "requests": len(lat),
                        "per_s": round(float(np.median([rate(r) for r in rs])), 1),
                        "p50_ms": round(float(np.percentile(lat, 50)), 3),
                        "cpu_ms_per_request": round(float(np.median(per)), 3),
                        "cpu_ms_min_max": [round(min(per), 3), round(max(per), 3)],
                        "cpu_ms_rounds": [round(v, 3) for v in per],
                    }
                )
        return rows
    finally:
        for proc, _ in servers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


def phone_size(photo: bytes) -> bytes:
    """The photo as a phone camera would send it: 12 MP, JPEG quality 90."""
    out = io.BytesIO()
    Image.open(io.BytesIO(photo)).convert("RGB").resize((4032, 3024)).save(out, "JPEG", quality=90)
    return out.getvalue()


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "CPU unknown"


def markdown(rows: list[dict[str, Any]], command: str, photos: str) -> str:
    lines = [
        "# The service's own CPU a request (the pipeline answered from a memo)",
        "",
        f"`{command}`: {os.cpu_count()} CPUs ({cpu_name()}), Python {sys.version.split()[0]}; the demo index and "
        f"the shipped model behind a memo of each photo's real answer ({photos}); the client shares the "
        "cores. Median of the "
        "rounds (min-max); each round's figure is in the JSON.",
        "",
        "| request path | concurrency | requests/s | p50 ms | server CPU ms a request: median (min-max) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["cpu_ms_min_max"]
        lines.append(
            f"| {r['path']} | {r['concurrency']} | {r['per_s']} | {r['p50_ms']} | "
            f"{r['cpu_ms_per_request']} ({lo}-{hi}) |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per round, path and concurrency")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--model", type=Path, default=SHIPPED_MODEL_DIR)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument(
        "--phone",
        action="store_true",
        help="phone-size uploads: 8 of the photos upscaled to 12 MP JPEG (about 0.75 MB) instead of the 60",
    )
    ap.add_argument("--serve-on", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=list(PATHS), default="lane", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_on:
        serve(args.serve_on, args.path)
        return
    index = demo_index(args.model, args.work)
    env = {
        **os.environ,
        "VPS_INDEX_DIR": str(index),
        "VPS_MODEL_DIR": str(args.model),
        "VPS_ORT_INTRA_OP_THREADS": "1",
        "VPS_MAX_INFLIGHT": "64",
        "VPS_LOG_LEVEL": "INFO",
    }
    photos = read_catalogue(DEMO / "queries.csv")[0] + read_catalogue(DEMO / "calibration.csv")[0]
    payloads = [(DEMO / "images" / r.image).read_bytes() for r in photos]  # bench_service.py's 60 photos
    if args.phone:
        payloads = [phone_size(p) for p in payloads[:8]]
    rows = measure(args, payloads, env)
    command = "python scripts/bench_overhead.py " + " ".join(sys.argv[1:])
    sent = f"{len(payloads)} photos of {np.mean([len(p) for p in payloads]) / 1e3:.0f} kB on average"
    text = markdown(rows, command, sent)
    write_report(args.out, "bench_overhead", "phone" if args.phone else "", command, rows, text)
    print(text)


if __name__ == "__main__":
    main()
