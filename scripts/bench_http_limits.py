"""HTTP-layer hostility against a running service, over raw sockets: a huge header, many headers, idle partial
heads, and a burst of concurrent searches. Every phase is bounded in count and time.

    python scripts/bench_http_limits.py --url http://127.0.0.1:8000 --server-pid <pid> --out docs/bench

Phases:
1. big header: one request whose single header is --big-header-mb MB; its answer, how long it took, /healthz
   latency meanwhile, RSS before and after;
2. many headers: one request with --many-headers headers; its answer, time, RSS after;
3. idle: --idle-connections connections send a partial head (--idle-pad more bytes) and then nothing, for at
   most --idle-s seconds (RSS while they are held);
   meanwhile /healthz and /search are asked every 0.5 s; when (and with what) the server closed the idle ones;
4. burst: --burst searches at once, each on its own connection; statuses, JSON or not, Retry-After.
Writes <out>/http_limits[-TAG].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from benchlib import encode_search


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20, 1)
    except psutil.NoSuchProcess:
        return None


async def exchange(host: str, port: int, raw: bytes, timeout: float = 30.0) -> dict[str, Any]:
    """Send `raw` on a new connection, read one answer (or the close). Returns status, headers, body, seconds."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port, limit=2**20)
    try:
        try:
            writer.write(raw)
            await asyncio.wait_for(writer.drain(), timeout)
        except (ConnectionError, TimeoutError):
            pass  # the server may answer and close before it read everything
        return await read_answer(reader, timeout) | {"s": round(time.perf_counter() - t0, 3)}
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader, timeout: float) -> dict[str, Any]:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except (asyncio.IncompleteReadError, ConnectionError):
        return {"status": "closed"}
    except TimeoutError:
        return {"status": "timeout"}
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    try:
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), timeout)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        body = b""
    return {"status": int(lines[0].split(" ", 2)[1]), "headers": headers, "body": body.decode("utf-8", "replace")}


def kind(answer: dict[str, Any]) -> str:
    """`200`, `503 json`, `503 text`, ... : the status and whether the body is the service's JSON error."""
    status = answer["status"]
    if not isinstance(status, int):
        return str(status)
    if status == 200:
        return "200"
    try:
        is_json = "code" in json.loads(answer["body"])["error"]
    except (ValueError, KeyError, TypeError):
        is_json = False
    return f"{status} {'json' if is_json else 'text'}"


async def healthz_probe(host: str, port: int, stop: asyncio.Event, every_s: float = 0.1) -> list[float]:
    latencies = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await exchange(host, port, f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), timeout=30)
        latencies.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(every_s)
    return latencies


async def big_header(host: str, port: int, mb: int, pid: int | None) -> dict[str, Any]:
    before = rss_mb(pid)
    raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (mb * 2**20) + b"\r\n\r\n"
    stop = asyncio.Event()
    probe = asyncio.create_task(healthz_probe(host, port, stop))
    answer = await exchange(host, port, raw, timeout=60)
    stop.set()
    health = await probe
    return {
        "header_mb": mb,
        "answer": kind(answer),
        "connection": answer.get("headers", {}).get("connection"),
        "seconds": answer["s"],
        "healthz_p50_ms": round(float(np.median(health)), 2) if health else None,
        "healthz_max_ms": round(max(health), 2) if health else None,
        "rss_before_mb": before,
        "rss_after_mb": rss_mb(pid),
    }


async def many_headers(host: str, port: int, n: int, pid: int | None) -> dict[str, Any]:
    before = rss_mb(pid)
    raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * n + b"\r\n"
    answer = await exchange(host, port, raw, timeout=60)
    await asyncio.sleep(1.0)
    return {
        "headers": n,
        "answer": kind(answer),
        "connection": answer.get("headers", {}).get("connection"),
        "seconds": answer["s"],
        "rss_before_mb": before,
        "rss_after_mb": rss_mb(pid),
    }


async def idle(host: str, port: int, n: int, seconds: float, image: bytes, pad: int, pid: int | None) -> dict[str, Any]:
    before = rss_mb(pid)
    conns = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * pad)  # never finished
        conns.append((reader, writer))
    await asyncio.sleep(1.0)
    held = rss_mb(pid)
    t0 = time.perf_counter()
    closed_at: list[float] = []
    got: dict[str, int] = {}

    async def watch(reader: asyncio.StreamReader) -> None:
        answer = await read_answer(reader, seconds)
        if answer["status"] != "timeout":
            closed_at.append(time.perf_counter() - t0)
        got[kind(answer)] = got.get(kind(answer), 0) + 1

    watchers = [asyncio.create_task(watch(r)) for r, _ in conns]
    search = encode_search(host, image)
    timeline: list[dict[str, Any]] = []
    while time.perf_counter() - t0 < seconds:
        h, s = await asyncio.gather(
            exchange(host, port, f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode(), timeout=5),
            exchange(host, port, search, timeout=5),
        )
        timeline.append({"t_s": round(time.perf_counter() - t0, 1), "healthz": kind(h), "search": kind(s)})
        await asyncio.sleep(0.5)
    await asyncio.gather(*watchers)
    for _, writer in conns:
        writer.close()
    counts: dict[str, dict[str, int]] = {"healthz": {}, "search": {}}
    for point in timeline:
        for route in counts:
            counts[route][point[route]] = counts[route].get(point[route], 0) + 1
    return {
        "connections": n,
        "head_bytes_each": 40 + pad,
        "rss_before_mb": before,
        "rss_held_mb": held,
        "seconds": seconds,
        "idle_closed_by_server": len(closed_at),
        "idle_closed_after_s": [round(min(closed_at), 2), round(max(closed_at), 2)] if closed_at else None,
        "idle_got": got,
        "probes": counts,
        "timeline": timeline,
    }


async def burst(host: str, port: int, n: int, image: bytes) -> dict[str, Any]:
    raw = encode_search(host, image)
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(exchange(host, port, raw, timeout=60) for _ in range(n)))
    elapsed = time.perf_counter() - t0
    kinds: dict[str, int] = {}
    for a in answers:
        kinds[kind(a)] = kinds.get(kind(a), 0) + 1
    refused = [a for a in answers if a["status"] != 200]
    ok = [a["s"] * 1000 for a in answers if a["status"] == 200]
    return {
        "concurrent": n,
        "seconds": round(elapsed, 2),
        "answers": kinds,
        "answered_200": len(ok),
        "refusals_without_retry_after": sum("retry-after" not in a.get("headers", {}) for a in refused),
        "ok_p99_ms": round(float(np.percentile(ok, 99)), 1) if ok else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--server-pid", type=int, default=None)
    ap.add_argument("--image", type=Path, default=Path("examples/grocery/images/val/Fruit/Avocado/Avocado_001.jpg"))
    ap.add_argument("--big-header-mb", type=int, default=64)
    ap.add_argument("--many-headers", type=int, default=1_000_000)
    ap.add_argument("--idle-connections", type=int, default=260)
    ap.add_argument("--idle-s", type=float, default=20.0)
    ap.add_argument("--idle-pad", type=int, default=0, help="bytes of header value each idle connection sends")
    ap.add_argument("--burst", type=int, default=300)
    ap.add_argument("--phases", default="big,many,idle,burst", help="comma-separated subset to run")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--tag", default="", help="files are http_limits[-TAG].json and .md")
    args = ap.parse_args()
    hostport = args.url.split("://", 1)[1].split("/", 1)[0]
    host, _, port_text = hostport.partition(":")
    port = int(port_text or 80)
    image = args.image.read_bytes()

    result: dict[str, Any] = {"command": "python scripts/bench_http_limits.py " + " ".join(sys.argv[1:])}
    phases = set(args.phases.split(","))
    if "big" in phases:
        result["big_header"] = asyncio.run(big_header(host, port, args.big_header_mb, args.server_pid))
    if "many" in phases:
        result["many_headers"] = asyncio.run(many_headers(host, port, args.many_headers, args.server_pid))
    if "idle" in phases:
        result["idle"] = asyncio.run(
            idle(host, port, args.idle_connections, args.idle_s, image, args.idle_pad, args.server_pid)
        )
        time.sleep(1.0)
    if "burst" in phases:
        result["burst"] = asyncio.run(burst(host, port, args.burst, image))

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"http_limits-{args.tag}" if args.tag else "http_limits"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# HTTP limits: huge heads, idle connections, a burst",
        "",
        f"`{result['command']}`",
        "",
        "| case | answer | figures |",
        "|---|---|---|",
    ]
    if b := result.get("big_header"):
        lines.append(
            f"| one {b['header_mb']} MB header | {b['answer']} (connection: {b['connection']}) | {b['seconds']} s; "
            f"/healthz meanwhile p50 {b['healthz_p50_ms']} ms, max {b['healthz_max_ms']} ms; "
            f"RSS {b['rss_before_mb']} -> {b['rss_after_mb']} MB |"
        )
    if m := result.get("many_headers"):
        lines.append(
            f"| {m['headers']} headers | {m['answer']} (connection: {m['connection']}) | {m['seconds']} s; "
            f"RSS {m['rss_before_mb']} -> {m['rss_after_mb']} MB |"
        )
    if i := result.get("idle"):
        lines.append(
            f"| {i['connections']} idle partial heads ({i['head_bytes_each']} bytes each) for {i['seconds']} s "
            f"| idle got {i['idle_got']} | closed by the server: {i['idle_closed_by_server']} (after "
            f"{i['idle_closed_after_s']} s); /healthz {i['probes']['healthz']}, /search {i['probes']['search']}; "
            f"RSS {i['rss_before_mb']} -> {i['rss_held_mb']} MB while held |"
        )
    if u := result.get("burst"):
        lines.append(
            f"| {u['concurrent']} concurrent searches | {u['answers']} | {u['seconds']} s; "
            f"{u['refusals_without_retry_after']} refusals without Retry-After; 200 p99 {u['ok_p99_ms']} ms |"
        )
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
