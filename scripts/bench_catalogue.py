"""Live catalogue changes (issue 18 item 7): writes per second, time until a write is visible on a second worker,
and search latency with a live delta against the compacted index, side by side in one run.

    python scripts/bench_catalogue.py                            # defaults, docs/bench: ~5 min here (a first run
                                                                  # also builds the indexes, cached: ~6 min more)
    python scripts/bench_catalogue.py --quick --out /tmp/bc      # ~1 min: smaller index, fewer writes
    python scripts/bench_catalogue.py --parts search --profile   # search part only, with a cProfile of the 10k delta

1. Writes (`--parts writes`), one image each (POST /v1/products/{sku}/images with one `image` part, to products
   created beforehand), on SQLite (WAL, synchronous=FULL) and PostgreSQL (a scratch database, dropped at the end),
   at each --concurrency, each cell bounded by --write-seconds and --max-writes and run in two rounds whose order
   rotates. Four ways, so that the split shows: `embed` (decode + embed in process, no database), `store`
   (CatalogueStore.add_images with the vector precomputed: the commit alone), `store+sync` (the commit and the
   follower's sync into an in-process engine: what the route does after embedding) and `http` (a real
   `vps serve`, grocery-lite0-ms512, an index of two photos a category of the demo catalogue that `vps build-index`
   imported into the scratch database: writes need a version built from the database). Every image has unique
   bytes (a counter after the JPEG's end), so every write stores a new blob and a new embedding.
2. Visibility (`--parts visibility`): two `vps serve` processes (A, B) on different ports sharing the catalogue
   database, both with VPS_SYNC_S at each --sync value; --visible-writes writes through A, each after a random
   pause of up to one sync interval; after A's 201 the client polls B with the written image itself
   (`category=` forced to the product's, k=10) until the SKU is among the results. Time from A's 201 to the first
   answer of B that holds it: p50 / p99 / max.
3. Search (`--parts search`): a base index of --base synthetic unit vectors (512-d, --categories categories of
   Zipf-like size, 5 per SKU), built by the service's own build (publish_vectors, the service's M and
   efConstruction unless told), loaded as the service loads it. New SKUs drawn from the same distribution (same
   categories, same Zipf spread) make the delta (Delta.applied, as the follower builds it) at each --deltas size,
   and the compacted equivalent: the same base shards with the same delta vectors added to each category's HNSW
   graph (as a build on the union inserts them), the same item table plus the new rows, the same router, so both
   probe the same shards and only where the new vectors live differs. In process, `search_vector` with
   `resolve_params` (the service's defaults; and three shards a query, as a less certain router probes), one
   thread (OMP_NUM_THREADS=1), the same queries for every variant, interleaved in blocks of --block queries whose
   variant order rotates (side by side), every shard's pages touched first. p50/p99, the ratio to the compacted
   index of the same content (also paired block by block), the stage split, the delta scans timed alone, and how
   often the two agree. Also what Delta.applied costs to fold in one
   changed SKU at each delta size (the follower's work per sync) and the whole delta at once (a catch-up).

Writes <out>/bench_catalogue.json and .md (or bench_catalogue-<tag>.*).
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import itertools
import json
import os
import platform
import pstats
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Same thread discipline as `vps serve`, before numpy's, faiss's and onnxruntime's pools start.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import faiss  # noqa: E402
import httpx  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from bench_service import demo_index  # noqa: E402
from benchlib import free_port, read_response  # noqa: E402

from app.artifacts.items import ItemTable  # noqa: E402
from app.artifacts.manifest import read_manifest, resolve_current  # noqa: E402
from app.artifacts.shards import FaissHnswShard  # noqa: E402
from app.catalogue.follow import CatalogueFollower  # noqa: E402
from app.catalogue.store import CatalogueStore, NewImage, sha256_of  # noqa: E402
from app.engine.delta import Delta, DeltaImage, DeltaProduct  # noqa: E402
from app.engine.embedding import OnnxEmbedder  # noqa: E402
from app.engine.search import SearchEngine, SearchParams, Shard, resolve_params  # noqa: E402
from app.offline.build.build_index import BuildOptions, publish_vectors  # noqa: E402
from app.offline.datasets.catalogue import CatalogueRow, read_catalogue  # noqa: E402
from app.service.config import Settings  # noqa: E402
from app.service.engines import load_engine, search_defaults  # noqa: E402

MODEL = Path("models/grocery-lite0-ms512")
DEMO = Path("examples/grocery")
TOKEN = "bench-catalogue-token"  # noqa: S105 - a scratch server's admin token
POSTGRES_ADMIN_URL = os.environ.get("VPS_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PER_SKU = 5  # synthetic vectors per SKU (base and delta alike)
DATA_VERSION = 1  # bump when the synthetic data changes: cached builds are keyed by it


# --- helpers ---------------------------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)) * 1000, 3) if xs else float("nan")


def summary(lat_s: list[float]) -> dict[str, Any]:
    return {"n": len(lat_s), "p50_ms": pct(lat_s, 50), "p99_ms": pct(lat_s, 99), "max_ms": pct(lat_s, 100)}


def app_mtime() -> float:
    """Newest modification time of the service's code: others may edit it while a run goes on."""
    return max(p.stat().st_mtime for p in Path("app").rglob("*.py"))


def machine() -> dict[str, Any]:
    cpu = ""
    with suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if "model name" in ln), "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "app"], capture_output=True, text=True).stdout)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "onnxruntime": onnxruntime.__version__,
        "sqlite": sqlite3.sqlite_version,
        "numpy": np.__version__,
        "git_commit": commit + (" (app/ modified)" if dirty else ""),
        "load_average_1m_start": round(os.getloadavg()[0], 2),
    }


def demo_photos() -> list[bytes]:
    rows = read_catalogue(DEMO / "catalogue.csv")[0]
    return [(DEMO / "images" / r.image).read_bytes() for r in rows]


def unique(photo: bytes, serial: int) -> bytes:
    """The same pixels, new bytes (decoders stop at the JPEG's end): a new blob and embedding row per write."""
    return photo + f"vps-bench-catalogue-{os.getpid()}-{serial:08d}".encode()


def distinct_photos(photos: list[bytes], n: int, seed: int) -> list[bytes]:
    """n photos whose pixels differ (a small mark of a unique colour re-encoded): a query with one of them finds
    that one top-1, not a tie with an earlier write of the same photo."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        im = Image.open(io.BytesIO(photos[i % len(photos)])).convert("RGB")
        arr = np.asarray(im).copy()
        arr[:12, :12] = rng.integers(0, 256, size=3)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@contextmanager
def scratch_database(kind: str, work: Path) -> Iterator[str]:
    """A fresh, empty catalogue database: a new SQLite file, or a new PostgreSQL database dropped afterwards."""
    name = f"vps_bench_catalogue_{os.getpid()}"
    if kind == "sqlite":
        path = work / f"{name}.db"
        for p in work.glob(f"{name}.db*"):
            p.unlink()
        try:
            yield f"sqlite:///{path.absolute()}"
        finally:
            for p in work.glob(f"{name}.db*"):
                p.unlink()
        return
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def postgres_version() -> str | None:
    try:
        admin = sa.create_engine(POSTGRES_ADMIN_URL, connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            v = str(conn.exec_driver_sql("SHOW server_version").scalar_one())
        admin.dispose()
        return v
    except sa.exc.SQLAlchemyError:
        return None


class Server:
    """`vps serve` (one worker) on a free port, waited for until /readyz answers 200; stopped with SIGTERM."""

    def __init__(self, env: dict[str, str], log: Path, *, wait: bool = True) -> None:
        self.port = free_port()
        self.log_path = log
        self.log = log.open("ab")
        vps = str(Path(sys.executable).with_name("vps"))
        self.proc = subprocess.Popen(
            [vps, "serve", "--port", str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.base = f"http://127.0.0.1:{self.port}"
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        log = self.log_path
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None:
                raise SystemExit(f"vps serve exited with {self.proc.returncode} (log: {log})")
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"vps serve did not become ready (log: {log})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def server_env(index: Path, url: str, sync_s: float) -> dict[str, str]:
    return {
        **os.environ,
        "VPS_INDEX_DIR": str(index),
        "VPS_MODEL_DIR": str(MODEL),
        "VPS_CATALOGUE_URL": url,
        "VPS_ADMIN_TOKEN": TOKEN,
        "VPS_SYNC_S": str(sync_s),
        "VPS_MAX_INFLIGHT": "64",  # a closed loop above the pool queues instead of being refused
        "VPS_LOG_LEVEL": "WARNING",
    }


def encode_write(port: int, sku: str, image: bytes) -> bytes:
    """POST /v1/products/{sku}/images with one `image` part, encoded whole: the client's cost stays small."""
    boundary = "vpsbenchcatalogue"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="i.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/products/{sku}/images HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def raw_caller(port: int) -> Callable[[bytes], int]:
    """Keep-alive raw HTTP/1.1, one connection per calling thread; returns the status."""
    local = threading.local()

    def call(request: bytes) -> int:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = socket.create_connection(("127.0.0.1", port))
        try:
            conn.sendall(request)
            return read_response(conn)
        except (ConnectionError, OSError):  # an idle keep-alive the server closed: once more on a new one
            conn.close()
            conn = local.conn = socket.create_connection(("127.0.0.1", port))
            conn.sendall(request)
            return read_response(conn)

    return call


def bounded_loop(write: Callable[[], None], concurrency: int, max_count: int, seconds: float) -> dict[str, Any]:
    """`concurrency` threads calling `write` back to back until `max_count` calls or `seconds` have passed."""
    lock = threading.Lock()
    issued = [0]
    lat: list[float] = []
    errors: list[str] = []
    start = time.perf_counter()
    deadline = start + seconds

    def worker() -> None:
        while True:
            with lock:
                if issued[0] >= max_count or time.perf_counter() >= deadline:
                    return
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                write()
            except Exception as exc:  # counted and shown, the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"lat": lat, "elapsed_s": time.perf_counter() - start, "errors": errors}


# --- 1. writes -------------------------------------------------------------------------------------------------
@dataclass
class WriteRig:
    photos: list[bytes]
    vectors: list[np.ndarray]  # each photo's embedding (the store-only path writes it as a client would)
    engine: SearchEngine  # in process: embed-only, and the store+sync path's engine
    model_sha: str
    serial: Iterator[int]


def create_products(store: CatalogueStore, prefix: str, n: int, categories: list[str]) -> list[str]:
    skus = [f"{prefix}-{i:04d}" for i in range(n)]
    for i, sku in enumerate(skus):
        store.put_product(sku, categories[i % len(categories)], sku, {"bench": "catalogue"})
    return skus


def catalogue_index(url: str, kind: str, work: Path) -> Path:
    """An index version built through the catalogue database (writes need one: the database must hold every
    product of the live version): `vps build-index` imports a subset of the demo catalogue (two photos of each
    category; the index's size does not matter to a write) into the scratch database and compacts."""
    with (DEMO / "catalogue.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        fields, rows = list(reader.fieldnames or []), list(reader)
    seen: dict[str, int] = {}
    keep = []
    for row in rows:
        seen[row["category"]] = seen.get(row["category"], 0) + 1
        if seen[row["category"]] <= 2:
            keep.append(row)
    subset = work / f"catalogue-subset-{kind}.csv"
    with subset.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    out = work / f"index-catalogue-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    vps = str(Path(sys.executable).with_name("vps"))
    cmd = [vps, "build-index", "--catalogue", str(subset), "--images-root", str(DEMO / "images"), "--out", str(out)]
    cmd += ["--model", str(MODEL), "--catalogue-url", url]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"vps build-index through {kind} failed ({done.returncode}): {done.stderr[-2000:]}")
    return out


def bench_embed(args: argparse.Namespace, rig: WriteRig) -> dict[str, Any]:
    """Decode + embed alone, in process, at each concurrency (no database)."""
    out: dict[str, Any] = {}

    def embed_once() -> None:
        i = next(rig.serial)
        rig.engine.embed_image(unique(rig.photos[i % len(rig.photos)], i))

    for c in args.concurrency:
        runs = [bounded_loop(embed_once, c, args.max_writes // 2, args.write_seconds / 2) for _ in range(2)]
        out[str(c)] = merge(runs)
        print(json.dumps({"writes": "embed", "concurrency": c, **strip(out[str(c)])}), flush=True)
    return out


def bench_writes(
    args: argparse.Namespace, rig: WriteRig, index: Path, kind: str, url: str, work: Path
) -> dict[str, Any]:
    """store, store+sync and http writes on one database, at each concurrency, in rounds of rotating order."""
    rounds = 2
    store = CatalogueStore(url)
    engine = load_engine(Settings(index_dir=index, model_dir=MODEL))  # the store+sync path's engine
    # Products to add images to, spread over the index's categories (a write touches one segment).
    skus = create_products(store, f"w-{kind}", 100, engine.categories)
    server = Server(server_env(index, url, 1.0), work / f"serve-writes-{kind}.log")
    try:
        follower = CatalogueFollower(store, 1.0)
        follower.sync(engine)
        call = raw_caller(server.port)

        def via_store(sync: bool) -> None:
            i = next(rig.serial)
            j = i % len(rig.vectors)
            data = unique(rig.photos[j], i)
            store.add_images(skus[i % len(skus)], [NewImage(sha256_of(data), data, rig.vectors[j])], rig.model_sha)
            if sync:
                follower.sync(engine)

        def via_http() -> None:
            i = next(rig.serial)
            status = call(encode_write(server.port, skus[i % len(skus)], unique(rig.photos[i % len(rig.photos)], i)))
            if status != 201:
                raise RuntimeError(f"HTTP {status}")

        modes: dict[str, Callable[[], None]] = {
            "store": lambda: via_store(False),
            "store+sync": lambda: via_store(True),
            "http": via_http,
        }
        cells: dict[str, dict[str, list[dict[str, Any]]]] = {m: {str(c): [] for c in args.concurrency} for m in modes}
        for c in args.concurrency:
            for r in range(rounds):
                names = list(modes)
                for m in names[r % len(names) :] + names[: r % len(names)]:
                    run = bounded_loop(modes[m], c, args.max_writes // rounds, args.write_seconds / rounds)
                    cells[m][str(c)].append(run)
        res: dict[str, Any] = {m: {c: merge(runs) for c, runs in per.items()} for m, per in cells.items()}
        for m, per in res.items():
            for c, cell in per.items():
                print(json.dumps({"writes": m, "db": kind, "concurrency": c, **strip(cell)}), flush=True)
        res["delta_items_after"] = engine.delta.n_items
        return res
    finally:
        server.stop()
        store.close()


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    lat = [x for r in runs for x in r["lat"]]
    elapsed = sum(r["elapsed_s"] for r in runs)
    errors = [e for r in runs for e in r["errors"]]
    return {
        "writes": len(lat),
        "elapsed_s": round(elapsed, 3),
        "per_s": round(len(lat) / elapsed, 1) if elapsed else 0.0,
        **summary(lat),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def strip(cell: dict[str, Any]) -> dict[str, Any]:
    return {k: cell[k] for k in ("writes", "per_s", "p50_ms", "p99_ms", "errors")}


# --- 2. visibility on a second worker --------------------------------------------------------------------------
def bench_visibility(
    args: argparse.Namespace, images: list[bytes], index: Path, kind: str, url: str, work: Path
) -> dict[str, Any]:
    """Each --sync value: a pair of servers on this database, --visible-writes writes through A, polled on B."""
    category = read_manifest(resolve_current(index)).categories[0].name
    out: dict[str, Any] = {"category": category}
    rng = random.Random(7)  # noqa: S311 - write pauses, not secrets
    store = CatalogueStore(url)
    try:
        for n, sync_s in enumerate(args.sync):
            skus = [f"v-{kind}-{sync_s}-{i:03d}" for i in range(args.visible_writes)]
            for sku in skus:
                store.put_product(sku, category, sku, {})
            # Both start at once (start-up is mostly imports and the model load).
            a = Server(server_env(index, url, sync_s), work / f"serve-visible-a-{kind}.log", wait=False)
            b = Server(server_env(index, url, sync_s), work / f"serve-visible-b-{kind}.log", wait=False)
            try:
                a.wait_ready()
                b.wait_ready()
                mine = images[n * len(skus) : (n + 1) * len(skus)]
                cell = visibility_cell(a, b, skus, mine, category, sync_s, rng)
            finally:
                b.stop()
                a.stop()
            out[str(sync_s)] = cell
            print(json.dumps({"visible": kind, "sync_s": sync_s, **{k: v for k, v in cell.items() if k != "lag"}}))
    finally:
        store.close()
    return out


def visibility_cell(
    a: Server, b: Server, skus: list[str], images: list[bytes], category: str, sync_s: float, rng: random.Random
) -> dict[str, Any]:
    lags: list[float] = []
    writes: list[float] = []
    polls: list[float] = []
    on_a_at_201 = 0
    missed = 0
    deadline_s = 5 * sync_s + 5
    params = {"k": 10, "category": category}
    with httpx.Client(base_url=a.base, timeout=30) as ca, httpx.Client(base_url=b.base, timeout=30) as cb:
        for sku, image in zip(skus, images, strict=True):
            files = {"image": ("i.jpg", image, "image/jpeg")}
            time.sleep(rng.uniform(0, sync_s))  # a random phase against B's follower
            t0 = time.perf_counter()
            r = ca.post(f"/v1/products/{sku}/images", files=files, headers={"authorization": f"Bearer {TOKEN}"})
            acked = time.perf_counter()
            if r.status_code != 201:
                raise SystemExit(f"write through A: HTTP {r.status_code} {r.text[:200]}")
            writes.append(acked - t0)
            found_a = ca.post("/search", files=files, params=params).json()
            on_a_at_201 += any(x["sku"] == sku for x in found_a.get("results", []))
            while True:
                p0 = time.perf_counter()
                rb = cb.post("/search", files=files, params=params)
                p1 = time.perf_counter()
                polls.append(p1 - p0)
                if rb.status_code == 200 and any(x["sku"] == sku for x in rb.json()["results"]):
                    lags.append(p1 - acked)
                    break
                if p1 - acked > deadline_s:
                    missed += 1
                    break
                time.sleep(0.005)
    return {
        "writes": len(skus),
        "visible_on_b": len(lags),
        "not_visible_within_s": {"count": missed, "bound_s": deadline_s},
        "visible_on_a_at_201": on_a_at_201,
        "lag_p50_ms": pct(lags, 50),
        "lag_p99_ms": pct(lags, 99),
        "lag_max_ms": pct(lags, 100),
        "lag_min_ms": pct(lags, 0),
        "write_p50_ms": pct(writes, 50),
        "poll_p50_ms": pct(polls, 50),
        "lag": [round(x * 1000, 1) for x in lags],
    }


# --- 3. search with a delta against the compacted index ---------------------------------------------------------
@dataclass
class Synthetic:
    x: np.ndarray  # base rows first (n_base), then the delta pool, 5 per SKU in SKU order
    sku_cat: np.ndarray
    n_base: int
    queries: np.ndarray
    calibration: np.ndarray
    calibration_sku: np.ndarray
    probabilities: np.ndarray  # category weights (a write's category is drawn from them)


def synthetic(n_base: int, n_delta: int, n_cat: int, dim: int, n_queries: int, seed: int) -> Synthetic:
    """Clustered unit vectors as benchlib.synthetic_index draws them, with Zipf-like category sizes
    (bench_search.py's 0.8 exponent). The delta pool is more SKUs from the same distribution."""
    rng = np.random.default_rng(seed)
    n_sku = (n_base + n_delta) // PER_SKU
    w = 1.0 / np.arange(1, n_cat + 1) ** 0.8
    p = w / w.sum()
    sku_cat = rng.choice(n_cat, size=n_sku, p=p)
    cat_centres = rng.standard_normal((n_cat, dim), dtype=np.float32)
    sku_centres = cat_centres[sku_cat] + 0.8 * rng.standard_normal((n_sku, dim), dtype=np.float32)
    x = np.repeat(sku_centres, PER_SKU, axis=0)
    for i in range(0, len(x), 100_000):
        x[i : i + 100_000] += 0.5 * rng.standard_normal((min(100_000, len(x) - i), dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def views(skus: np.ndarray) -> np.ndarray:
        q = sku_centres[skus] + 0.5 * rng.standard_normal((len(skus), dim), dtype=np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    cal_sku = rng.integers(0, n_base // PER_SKU, size=1000)
    q_sku = rng.integers(0, n_sku, size=n_queries)  # base and delta SKUs alike
    return Synthetic(x, sku_cat, n_base, views(q_sku), views(cal_sku), cal_sku, p)


def sku_name(s: int) -> str:
    return f"sku-{s:07d}"


def cat_name(c: int) -> str:
    return f"cat-{c:03d}"


def build_base(data: Synthetic, out: Path, embedder: OnnxEmbedder, options: BuildOptions) -> float:
    """The service's own build of the base rows (cached: a later run reuses CURRENT); returns its build time."""
    marker = out / "bench-build.json"
    if (out / "CURRENT").exists() and marker.exists():
        return float(json.loads(marker.read_text())["build_s"])
    shutil.rmtree(out, ignore_errors=True)
    n = data.n_base
    sku_of = np.arange(n) // PER_SKU
    rows = [
        CatalogueRow(line=i + 2, sku=sku_name(s), category=cat_name(data.sku_cat[s]), image=f"synthetic/{i}.jpg")
        for i, s in enumerate(sku_of)
    ]
    cal_rows = [
        CatalogueRow(line=i + 2, sku=sku_name(s), category=cat_name(data.sku_cat[s]), image=f"query/{i}.jpg")
        for i, s in enumerate(data.calibration_sku)
    ]
    t0 = time.perf_counter()
    publish_vectors(data.x[:n], rows, out, embedder, options, calibration=(data.calibration, cal_rows))
    build_s = time.perf_counter() - t0
    marker.write_text(json.dumps({"build_s": build_s}))
    return build_s


def delta_rows(data: Synthetic, start: int, stop: int) -> Iterator[tuple[int, int]]:
    """(row, SKU) of the delta pool's rows start..stop (counted from the pool's first row)."""
    for r in range(data.n_base + start, data.n_base + stop):
        yield r, r // PER_SKU


def build_compacted(
    data: Synthetic, base: SearchEngine, version: Path, deltas: list[int], work: Path, M: int
) -> dict[int, Path]:
    """For each delta size: every base shard with that many delta vectors added in its category, in order (the
    graph a build on the union makes, base rows first), and the union's item table. Nested: each size starts from
    the previous one's shards. Cached beside the base build."""
    dirs: dict[int, Path] = {}
    prev_dir: Path | None = None
    prev = 0
    for d in sorted(x for x in deltas if x > 0):
        out = work / f"{version.name}-compacted-{d}"
        dirs[d] = out
        marker = out / "bench-build.json"
        if not marker.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            t0 = time.perf_counter()
            by_cat: dict[int, list[int]] = {}
            for r, s in delta_rows(data, prev, d):
                by_cat.setdefault(int(data.sku_cat[s]), []).append(r)
            for ci, entry in enumerate(base.manifest.categories):
                src = (prev_dir / f"{ci:04d}.faiss") if prev_dir else version / entry.shard
                index = faiss.read_index(str(src))
                c = int(entry.name.split("-")[1])
                if c in by_cat:
                    index.add(np.ascontiguousarray(data.x[by_cat[c]]))
                faiss.write_index(index, str(out / f"{ci:04d}.faiss"))
            write_items(data, base, d, out)
            marker.write_text(json.dumps({"build_s": time.perf_counter() - t0, "M": M}))
        prev_dir, prev = out, d
    return dirs


def write_items(data: Synthetic, base: SearchEngine, d: int, out: Path) -> None:
    rows_of: dict[int, list[int]] = {}
    for r, s in delta_rows(data, 0, d):
        rows_of.setdefault(int(data.sku_cat[s]), []).append(r)

    def rows() -> Iterator[dict[str, Any]]:
        for entry in base.manifest.categories:
            for row in range(entry.offset, entry.offset + entry.n_vectors):
                yield base.items.get(row)
            for r in rows_of.get(int(entry.name.split("-")[1]), []):
                s = r // PER_SKU
                yield {"sku": sku_name(s), "category": entry.name, "image": f"delta/{r}.jpg", "title": None,
                       "attributes": {}}  # fmt: skip

    ItemTable.write(rows(), out / "items.jsonl", out / "items.offsets.npy")


def compacted_engine(base: SearchEngine, out: Path, ef_search: int, data: Synthetic, d: int) -> SearchEngine:
    counts: dict[int, set[int]] = {}
    for _r, s in delta_rows(data, 0, d):
        counts.setdefault(int(data.sku_cat[s]), set()).add(s)
    shards, offset = [], 0
    for ci, entry in enumerate(base.manifest.categories):
        index = FaissHnswShard.load(out / f"{ci:04d}.faiss", ef_search=ef_search)
        added = counts.get(int(entry.name.split("-")[1]), set())
        shards.append(Shard(entry.name, offset, index, n_skus=entry.n_skus + len(added)))
        offset += index.ntotal
    return SearchEngine(
        embedder=base.embedder,
        router=base.router,
        shards=shards,
        items=ItemTable.load(out / "items.jsonl", out / "items.offsets.npy"),
        manifest=base.manifest,
        max_image_pixels=base.max_image_pixels,
        overfetch=base.overfetch,
        max_decode_bytes=base.max_decode_bytes,
        decode_budget=base.decode_budget,
    )


def touch(engine: SearchEngine) -> None:
    """Read every shard's vectors through its memory map once: no variant pays page faults (from disk or not)
    that another already paid. Measured: without it, the first pass over a shared base engine was the slow one."""
    for shard in engine.shards:
        shard.index.vectors()


def delta_product(data: Synthetic, s: int, start: int, stop: int) -> DeltaProduct:
    c = cat_name(int(data.sku_cat[s]))
    rows = range(max(s * PER_SKU, data.n_base + start), min((s + 1) * PER_SKU, data.n_base + stop))
    images = tuple(DeltaImage(f"{r:024x}", data.x[r]) for r in rows)
    return DeltaProduct(sku_name(s), c, sku_name(s), {}, images)


def make_delta(data: Synthetic, base_seq: int, d: int) -> tuple[Delta, float]:
    """The delta holding the pool's first d rows, folded in at once (what a follower catching up does)."""
    skus = sorted({s for _r, s in delta_rows(data, 0, d)})
    updates: dict[str, DeltaProduct | None] = {sku_name(s): delta_product(data, s, 0, d) for s in skus}
    t0 = time.perf_counter()
    delta = Delta.empty(base_seq).applied(updates, base_seq + len(updates), time.time())
    return delta, time.perf_counter() - t0


def fold_one_cost(data: Synthetic, delta: Delta, reps: int, rng: np.random.Generator) -> dict[str, Any]:
    """Delta.applied for one changed SKU (one new image in a category drawn like the data's), `reps` times."""
    dim = data.x.shape[1]
    lat, seg = [], []
    for j in range(reps):
        c = int(rng.choice(len(data.probabilities), p=data.probabilities))
        v = rng.standard_normal(dim).astype(np.float32)
        prod = DeltaProduct(f"fold-{j}", cat_name(c), "", {}, (DeltaImage(f"{j:024x}", v / np.linalg.norm(v)),))
        t0 = time.perf_counter()
        nxt = delta.applied({prod.sku: prod}, delta.seq + 1, time.time())
        lat.append(time.perf_counter() - t0)
        seg.append(len(nxt.segments[cat_name(c)].items))
    return {
        **summary(lat),
        "mean_ms": round(float(np.mean(lat)) * 1000, 3),
        "segment_rows_p50": int(np.median(seg)),
        "segment_rows_max": int(max(seg)),
    }


@dataclass
class Variant:
    name: str
    delta_items: int
    engine: SearchEngine
    delta: Delta
    lat: list[float]
    stages: dict[str, float]
    top: list[list[str]]
    block_p50: list[float] = field(default_factory=list)  # median of each interleaved block, in block order


def bench_search(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    deltas = sorted(set(args.deltas) | {0})
    max_d = max(deltas)
    data = synthetic(args.base, max_d, args.categories, 512, args.queries, seed=args.base + DATA_VERSION)
    embedder = OnnxEmbedder(MODEL)
    options = BuildOptions(M=args.M, ef_construction=args.ef_construction, progress=False)
    key = f"base-{args.base}-c{args.categories}-M{args.M}-efc{args.ef_construction}-v{DATA_VERSION}-pool{max_d}"
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # builds use every core; searches are measured on one
    base_dir = work / key
    build_s = build_base(data, base_dir, embedder, options)
    base = load_engine(Settings(index_dir=base_dir, model_dir=MODEL, verify_shards="before_ready"))  # reads a shard
    version = resolve_current(base_dir)
    ef = int(base.shards[0].index._index.hnsw.efSearch)  # type: ignore[attr-defined]
    compacted_dirs = build_compacted(data, base, version, deltas, work / key, args.M)
    faiss.omp_set_num_threads(1)
    params = resolve_params(base.manifest, search_defaults(Settings(index_dir=base_dir, model_dir=MODEL)))
    touch(base)

    engines: list[tuple[str, int, SearchEngine, Delta]] = [("compacted", 0, base, base.delta)]
    fold: dict[str, Any] = {}
    catch_up: dict[str, float] = {}
    rng = np.random.default_rng(3)
    for d in deltas:
        if d == 0:
            fold["0"] = fold_one_cost(data, base.delta, args.fold_reps, rng)
            continue
        delta, catch_up_s = make_delta(data, base.delta.base_seq, d)
        catch_up[str(d)] = round(catch_up_s, 3)
        fold[str(d)] = fold_one_cost(data, delta, args.fold_reps, rng)
        engines.append(("base + delta", d, base, delta))
        comp = compacted_engine(base, compacted_dirs[d], ef, data, d)
        touch(comp)
        engines.append(("compacted", d, comp, comp.delta))
        print(json.dumps({"delta": d, "catch_up_s": catch_up[str(d)], "fold_one": fold[str(d)]}), flush=True)

    # The service's routing (the manifest's policy), and three shards a query as a less certain router probes
    # (real grocery embeddings: 2.2-2.5 on average, README): the delta's cost grows with the shards probed.
    settings = {"manifest": params, "3 shards": replace(params, probe_mass=1.0, max_probes=3)}
    results = {}
    for name, prm in settings.items():
        variants = [Variant(*e, [], {}, []) for e in engines]
        measure(variants, data.queries, prm, args)
        probes = [len(base.route(q, prm, base.delta)[1]) for q in data.queries[:200]]
        results[name] = {
            "params": {"k": prm.k, "probe_mass": prm.probe_mass, "max_probes": prm.max_probes},
            "shards_probed_mean": round(float(np.mean(probes)), 2),
            "rows": variant_rows(variants, args.base),
            "delta_scans_per_query": {
                str(v.delta_items): delta_scans(v, data.queries[:300], prm) for v in variants if v.name != "compacted"
            },
        }
        results[name]["requests"] = measure_requests(variants, data.queries, prm, args.requests)
        if args.profile:
            results[name]["profile"] = profile_search(variants, data.queries, prm, 10_000)
    base.delta = Delta.empty(base.delta.base_seq)
    sizes = np.bincount(data.sku_cat[: args.base // PER_SKU], minlength=args.categories) * PER_SKU
    return {
        "base_vectors": args.base,
        "categories": args.categories,
        "category_sizes": {"min": int(sizes.min()), "max": int(sizes.max())},
        "dim": 512,
        "queries": len(data.queries),
        "passes": args.passes,
        "block": args.block,
        "M": args.M,
        "ef_construction": args.ef_construction,
        "ef_search": ef,
        "fetch_per_shard": base.fetch_size(params),
        "base_build_s": round(build_s, 1),
        "routing": results,
        "fold_one_sku": fold,
        "catch_up_s": catch_up,
    }


def delta_scans(v: Variant, queries: np.ndarray, params: SearchParams) -> dict[str, float]:
    """The delta's exact scans alone (Delta.search on the probed categories' segments, filling aside), timed
    apart from the search: what they read and cost a query. The rest of a delta's extra search time is elsewhere."""
    rows, secs = 0, 0.0
    want = v.engine.fetch_size(params)
    for q in queries:
        _, probes, live = v.engine.route(q, params, v.delta)
        names = [v.engine.shards[p.category].name for p in probes] + live
        rows += sum(len(seg.items) for n in names if (seg := v.delta.segments.get(n)) is not None)
        query = np.ascontiguousarray(q[None], dtype=np.float32)
        t0 = time.perf_counter()
        for n in names:
            v.delta.search(n, query, want)
        secs += time.perf_counter() - t0
    return {"rows": round(rows / len(queries), 1), "ms": round(secs / len(queries) * 1000, 4)}


def measure(variants: list[Variant], queries: np.ndarray, params: SearchParams, args: argparse.Namespace) -> None:
    """Every variant on the same queries, interleaved in blocks of `args.block` queries whose variant order
    rotates. Blocks, not single queries: the base + delta variants share the base engine, and the same query
    run back to back on the same graph would find its nodes in the CPU cache (measured: up to 15 % faster)."""

    def run(v: Variant, q: np.ndarray) -> Any:
        v.engine.delta = v.delta
        t0 = time.perf_counter()
        outcome = v.engine.search_vector(q, params)
        return time.perf_counter() - t0, outcome

    for v in variants:  # warm-up: each index's pages and the code paths
        for q in queries[: args.warmup]:
            run(v, q)
    blocks = [range(i, min(i + args.block, len(queries))) for i in range(0, len(queries), args.block)]
    for p in range(args.passes):
        for b, block in enumerate(blocks):
            k = (b + p) % len(variants)
            for v in variants[k:] + variants[:k]:
                start = len(v.lat)
                for i in block:
                    dt, outcome = run(v, queries[i])
                    v.lat.append(dt)
                    for stage, s in outcome.timings_s.items():
                        v.stages[stage] = v.stages.get(stage, 0.0) + s
                    if p == 0:
                        v.top.append([str(h.item["sku"]) for h in outcome.results])
                v.block_p50.append(float(np.median(v.lat[start:])))


def measure_requests(variants: list[Variant], queries: np.ndarray, params: SearchParams, n: int) -> dict[str, Any]:
    """What a search request costs in process: decode and embed a demo photo (grocery-lite0-ms512), then search.
    The search is of the synthetic query in place of the photo's embedding, which the synthetic router knows
    nothing of: the same shards and delta rows as the stage measured above. Per delta size, base + delta and
    compacted take turns query by query (the order alternating); ratios of medians and the median of the
    per-query ratios."""
    photos = demo_photos()
    out: dict[str, Any] = {}
    by_size: dict[int, dict[str, Variant]] = {}
    for v in variants:
        if v.delta_items:
            by_size.setdefault(v.delta_items, {})[v.name] = v
    for d, pair in sorted(by_size.items()):
        if len(pair) < 2:
            continue
        lat: dict[str, list[float]] = {"base + delta": [], "compacted": []}
        for i in range(n):
            order = ["base + delta", "compacted"] if i % 2 == 0 else ["compacted", "base + delta"]
            for name in order:
                v = pair[name]
                v.engine.delta = v.delta
                t0 = time.perf_counter()
                v.engine.embed_image(photos[i % len(photos)])
                v.engine.search_vector(queries[i % len(queries)], params)
                lat[name].append(time.perf_counter() - t0)
        ratios = np.asarray(lat["base + delta"]) / np.asarray(lat["compacted"])
        out[str(d)] = {
            "requests": n,
            "compacted": summary(lat["compacted"]),
            "base_plus_delta": summary(lat["base + delta"]),
            "p50_ratio": round(pct(lat["base + delta"], 50) / pct(lat["compacted"], 50), 3),
            "paired_ratio_median": round(float(np.median(ratios)), 3),
        }
        print(json.dumps({"requests": d, **out[str(d)]}), flush=True)
    return out


def variant_rows(variants: list[Variant], n_base: int) -> list[dict[str, Any]]:
    rows = []
    compacted = {v.delta_items: v for v in variants if v.name == "compacted"}
    for v in variants:
        ref = compacted[v.delta_items]
        same_top1 = np.mean([a[:1] == b[:1] for a, b in zip(v.top, ref.top, strict=True)])
        overlap = np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(v.top, ref.top, strict=True)])
        n = len(v.lat)
        # Paired: each block's median against the compacted variant's median on the same queries, run within
        # ~0.1 s of each other: a burst of load from elsewhere on this shared machine hits both.
        paired = np.asarray(v.block_p50) / np.asarray(ref.block_p50)
        rows.append(
            {
                "variant": v.name,
                "delta_items": v.delta_items,
                "index_vectors": n_base + v.delta_items,
                **summary(v.lat),
                "mean_ms": round(float(np.mean(v.lat)) * 1000, 4),
                "p50_ratio": round(pct(v.lat, 50) / pct(ref.lat, 50), 3),
                "p99_ratio": round(pct(v.lat, 99) / pct(ref.lat, 99), 3),
                "paired_block_ratio_median": round(float(np.median(paired)), 3),
                "paired_block_ratio_p10_p90": [round(float(x), 3) for x in np.percentile(paired, [10, 90])],
                "stages_mean_ms": {k: round(s / n * 1000, 4) for k, s in v.stages.items()},
                "top1_same_as_compacted": round(float(same_top1), 4),
                "top10_overlap_with_compacted": round(float(overlap), 4),
            }
        )
        print(json.dumps({k: rows[-1][k] for k in ("variant", "delta_items", "p50_ms", "p99_ms", "p50_ratio")}))
    return rows


def profile_search(variants: list[Variant], queries: np.ndarray, params: SearchParams, d: int) -> str | None:
    """cProfile of the queries on the base + delta variant of size d (the top functions by own time)."""
    v = next((x for x in variants if x.name == "base + delta" and x.delta_items == d), None)
    if v is None:
        return None
    v.engine.delta = v.delta
    prof = cProfile.Profile()
    prof.enable()
    for q in queries:
        v.engine.search_vector(q, params)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
    return buf.getvalue()


# --- report ------------------------------------------------------------------------------------------------------
def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Live catalogue: writes, visibility on a second worker, search with a delta",
        "",
        f"`{doc['command']}` — {m['cpus']} CPUs ({m['cpu_model']}, shared), {m['memory_gb']} GiB, Python "
        f"{m['python']}, faiss {m['faiss']}, onnxruntime {m['onnxruntime']}, SQLite {m['sqlite']}, PostgreSQL "
        f"{doc.get('postgres_version')}; commit {m['git_commit']}; 1-minute load average "
        f"{m['load_average_1m_start']} at the start, {doc['load_average_1m_end']} at the end. Run time "
        f"{doc['run_s']:.0f} s."
        + (
            f" **The service's code changed during this run** ({', '.join(doc['app_code_changed_during_run'])}): "
            "the in-process measurements use the code as it was at the start, servers started later the newer one."
            if doc["app_code_changed_during_run"]
            else ""
        ),
    ]
    if "search" in doc:
        lines += search_markdown(doc["search"])
    if "writes" in doc:
        lines += writes_markdown(doc["writes"], doc["settings"])
    if "visibility" in doc:
        lines += visibility_markdown(doc["visibility"])
    return "\n".join(lines) + "\n"


def search_markdown(s: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Search with a live delta against the compacted index",
        "",
        f"Base index: {s['base_vectors']:,} synthetic 512-d unit vectors, {s['categories']} categories "
        f"({s['category_sizes']['min']:,}-{s['category_sizes']['max']:,} vectors each, Zipf-like), 5 per SKU, built "
        f"by the service's build (faiss HNSW M={s['M']}, efConstruction={s['ef_construction']}; efSearch "
        f"{s['ef_search']}); the delta: new SKUs (5 images each) in the same categories, spread like the base. "
        "Compacted: the same shards with the delta's vectors added to each category's graph, the same item rows plus "
        "the new ones, the same router (so both probe the same shards). `search_vector` in process, one thread, "
        f"k=10, {s['fetch_per_shard']} images fetched per probed shard and per delta segment; {s['queries']} "
        f"queries x {s['passes']} passes, every variant on the same queries, interleaved in blocks of {s['block']} "
        "queries whose variant order rotates. Ratios: against the compacted index of the same content.",
    ]
    for name, r in s["routing"].items():
        p = r["params"]
        how = "the service's routing (the build chose it)" if name == "manifest" else "three shards a query"
        lines += [
            "",
            f"### {how}: probe_mass {p['probe_mass']}, max_probes {p['max_probes']} "
            f"({r['shards_probed_mean']} shards probed on average)",
            "",
            "| delta items | searched as | p50 ms | p99 ms | p50 vs compacted | p99 vs compacted | paired vs compacted "
            "(median of blocks; p10-p90) | route / search / group ms (mean) | delta scans a query: rows / ms | "
            "top-1 same as compacted | top-10 overlap |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in sorted(r["rows"], key=lambda x: (x["delta_items"], x["variant"] != "compacted")):
            st = row["stages_mean_ms"]
            split = " / ".join(f"{st.get(k, 0):.3f}" for k in ("route", "search", "group"))
            scan = r["delta_scans_per_query"].get(str(row["delta_items"])) if row["variant"] != "compacted" else None
            scanned = f"{scan['rows']:,.0f} / {scan['ms']:.3f}" if scan else "-"
            lines.append(
                f"| {row['delta_items']:,} | {row['variant']} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{row['p50_ratio']} | {row['p99_ratio']} | {row['paired_block_ratio_median']} "
                f"({row['paired_block_ratio_p10_p90'][0]}-{row['paired_block_ratio_p10_p90'][1]}) | {split} | "
                f"{scanned} | "
                f"{row['top1_same_as_compacted']} | "
                f"{row['top10_overlap_with_compacted']} |"
            )
        if r.get("requests"):
            lines += [
                "",
                "Search requests in process (decode + embed a demo photo with grocery-lite0-ms512, then the search "
                "above), base + delta and compacted taking turns request by request:",
                "",
                "| delta items | requests | compacted p50 / p99 ms | base + delta p50 / p99 ms | p50 ratio | "
                "median of per-request ratios |",
                "|---|---|---|---|---|---|",
            ]
            for d, q in r["requests"].items():
                c, b = q["compacted"], q["base_plus_delta"]
                lines.append(
                    f"| {int(d):,} | {q['requests']} | {c['p50_ms']} / {c['p99_ms']} | {b['p50_ms']} / {b['p99_ms']} "
                    f"| {q['p50_ratio']} | {q['paired_ratio_median']} |"
                )
        if r.get("profile"):
            lines += ["", "cProfile of the 10k-delta searches (own time):", "", "```", r["profile"].strip(), "```"]
    lines.append("")
    for name, r in s["routing"].items():
        goal = next((x for x in r["rows"] if x["variant"] == "base + delta" and x["delta_items"] == 10_000), None)
        if goal is None:
            continue
        # p50 and the paired ratio decide; p99 is shown, but on this shared machine it moves run to run by more
        # than 10 % for the compacted variants themselves.
        worst = max(goal["p50_ratio"], goal["paired_block_ratio_median"])
        verdict = "**met**" if worst <= 1.10 else "**NOT met**"
        comp = next(x for x in r["rows"] if x["variant"] == "compacted" and x["delta_items"] == 10_000)
        extra = goal["stages_mean_ms"]["search"] - comp["stages_mean_ms"]["search"]
        scan = r["delta_scans_per_query"]["10000"]
        lines.append(
            f"- Goal (issue 18), searches with a 10k-item delta within 10 % of the compacted latency, {name} "
            f"routing: {verdict} (p50 x{goal['p50_ratio']}, paired blocks x{goal['paired_block_ratio_median']}; "
            f"p99 x{goal['p99_ratio']}, noisy here). The search stage takes {extra:+.3f} ms (mean) more than "
            f"compacted, of which the delta's exact scans ({scan['rows']:,.0f} rows a query) take {scan['ms']:.3f} ms "
            f"timed alone; the other {extra - scan['ms']:+.3f} ms are spent around them (the base shards' search "
            "with a non-empty delta, the live candidates)."
        )
        req = r.get("requests", {}).get("10000")
        if req:
            worst_req = max(req["p50_ratio"], req["paired_ratio_median"])
            lines.append(
                f"  A whole search request (decode + embed + search), {name} routing: x{req['p50_ratio']} at p50, "
                f"x{req['paired_ratio_median']} request by request: "
                + ("within 10 %." if worst_req <= 1.10 else "**more than 10 %**.")
            )
    lines += [
        "",
        "What the follower pays per sync to fold one changed SKU into the delta (`Delta.applied`, one new image in a "
        "category drawn like the data), and a catch-up folding the whole delta at once:",
        "",
        "| delta items | fold 1 SKU p50 ms | p99 ms | rows in the rebuilt segment p50 / max | whole delta at once s |",
        "|---|---|---|---|---|",
    ]
    for d, f in s["fold_one_sku"].items():
        lines.append(
            f"| {int(d):,} | {f['p50_ms']} | {f['p99_ms']} | {f['segment_rows_p50']:,} / {f['segment_rows_max']:,} "
            f"| {s['catch_up_s'].get(d, 0)} |"
        )
    return lines


def writes_markdown(w: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Writes, one image each",
        "",
        f"Each cell at most {settings['max_writes']} writes and {settings['write_seconds']} s, in two rounds "
        "(mode order rotating); closed loop, the client on the same cores. `embed`: decode + embed in process, no "
        "database; `store`: CatalogueStore.add_images with the vector given (the commit alone); `store+sync`: that "
        "and the follower's sync into an in-process engine (what the route adds after embedding); `http`: "
        "`vps serve` (one worker, grocery-lite0-ms512, an index built through the scratch database from two photos a "
        "demo category), POST /v1/products/{sku}/images with one "
        "image, to 100 products spread over the index's categories. Unique bytes every write.",
        "",
        "| database | concurrency | mode | writes | writes/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, cell in w["embed"].items():
        lines.append(
            f"| (none) | {c} | embed | {cell['writes']} | {cell['per_s']} | {cell['p50_ms']} | {cell['p99_ms']} | "
            f"{cell['errors']} |"
        )
    for kind, res in w["databases"].items():
        for c in map(str, settings["concurrency"]):
            for mode in ("store", "store+sync", "http"):
                cell = res[mode][c]
                err = f"{cell['errors']}" + (f" ({cell['first_error']})" if cell["first_error"] else "")
                lines.append(
                    f"| {kind} | {c} | {mode} | {cell['writes']} | {cell['per_s']} | {cell['p50_ms']} | "
                    f"{cell['p99_ms']} | {err} |"
                )
    return lines


def visibility_markdown(v: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Time until visible on a second worker",
        "",
        "Two `vps serve` processes (A, B: one worker each, different ports, the same index as the writes) sharing "
        "the catalogue database, on top of the writes above (their delta is held). Each write (one image, through "
        "A) after a random pause of up to one sync interval; then B is "
        f"polled with that image (`category={v['category']}`, k=10) until the SKU is in its answer. Lag: from A's "
        "201 to B's first answer holding it (its resolution: one poll, `poll p50`).",
        "",
        "| database | VPS_SYNC_S | writes | visible on B | lag p50 ms | lag p99 ms | lag max ms | on A at the 201 "
        "| write p50 ms | poll p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, per in v["databases"].items():
        for sync_s, c in per.items():
            lines.append(
                f"| {kind} | {sync_s} | {c['writes']} | {c['visible_on_b']} | {c['lag_p50_ms']} | {c['lag_p99_ms']} "
                f"| {c['lag_max_ms']} | {c['visible_on_a_at_201']} | {c['write_p50_ms']} | {c['poll_p50_ms']} |"
            )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="*", choices=["writes", "visibility", "search"], default=None)
    ap.add_argument("--quick", action="store_true", help="~1 minute: 20k base, deltas to 10k, fewer writes")
    ap.add_argument("--db", nargs="*", choices=["sqlite", "postgresql"], default=["sqlite", "postgresql"])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4])
    ap.add_argument("--write-seconds", type=float, default=None, help="per cell (default 6; quick 1)")
    ap.add_argument("--max-writes", type=int, default=None, help="per cell (default 300; quick 60)")
    ap.add_argument("--visible-writes", type=int, default=None, help="per database and sync (default 30; quick 6)")
    ap.add_argument("--sync", type=float, nargs="*", default=None, help="VPS_SYNC_S values (default 1 0.2; quick 0.2)")
    ap.add_argument("--base", type=int, default=None, help="base index vectors (default 200000; quick 20000)")
    ap.add_argument("--categories", type=int, default=100)
    ap.add_argument("--deltas", type=int, nargs="*", default=None, help="default 0 1000 10000 100000")
    ap.add_argument("--queries", type=int, default=None, help="default 1000; quick 300")
    ap.add_argument("--passes", type=int, default=None, help="over the queries (default 2; quick 1)")
    ap.add_argument("--block", type=int, default=50, help="queries per interleaved block")
    ap.add_argument("--warmup", type=int, default=50, help="queries per variant before measuring")
    ap.add_argument("--fold-reps", type=int, default=30)
    ap.add_argument("--requests", type=int, default=300, help="search requests (decode+embed+search) per variant")
    ap.add_argument("--M", type=int, default=BuildOptions.M)
    ap.add_argument("--ef-construction", type=int, default=BuildOptions.ef_construction)
    ap.add_argument("--profile", action="store_true", help="cProfile the 10k-delta searches into the report")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-bench-catalogue")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--tag", default="", help="suffix of the output files: bench_catalogue-<tag>.json/.md")
    args = ap.parse_args()
    q = args.quick
    defaults = {
        "write_seconds": 1.0 if q else 6.0,
        "max_writes": 60 if q else 300,
        "visible_writes": 6 if q else 30,
        "base": 20_000 if q else 200_000,
        "deltas": [0, 1000, 10_000] if q else [0, 1000, 10_000, 100_000],
        "queries": 300 if q else 1000,
        "sync": [0.2] if q else [1.0, 0.2],
        "passes": 1 if q else 2,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    parts = args.parts or ["search", "writes", "visibility"]
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    app_mtime_start = app_mtime()
    doc: dict[str, Any] = {
        "command": " ".join(["python scripts/bench_catalogue.py", *sys.argv[1:]]),
        "machine": machine(),
        "postgres_version": postgres_version(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    db_kinds = [k for k in args.db if k != "postgresql" or doc["postgres_version"] is not None]
    if len(db_kinds) < len(args.db):
        print("PostgreSQL unreachable at", POSTGRES_ADMIN_URL.split("@")[-1], ": SQLite only", file=sys.stderr)
    if "search" in parts:
        doc["search"] = bench_search(args, args.work)
    if "writes" in parts or "visibility" in parts:
        photos = demo_photos()
        if "writes" in parts:
            engine = load_engine(Settings(index_dir=demo_index(MODEL, args.work), model_dir=MODEL))
            vectors = [engine.embed_image(p)[0] for p in photos[:97]]
            rig = WriteRig(photos, vectors, engine, engine.embedder.card.sha256, itertools.count())
            doc["writes"] = {"embed": bench_embed(args, rig), "databases": {}}
        if "visibility" in parts:
            doc["visibility"] = {"databases": {}}
            images = distinct_photos(photos, args.visible_writes * len(args.sync), seed=7)
        for kind in db_kinds:  # one scratch database each: writes, then visibility on top of them
            with scratch_database(kind, args.work) as url:
                index = catalogue_index(url, kind, args.work)
                if "writes" in parts:
                    doc["writes"]["databases"][kind] = bench_writes(args, rig, index, kind, url, args.work)
                if "visibility" in parts:
                    cells = bench_visibility(args, images, index, kind, url, args.work)
                    doc["visibility"]["category"] = cells.pop("category")
                    doc["visibility"]["databases"][kind] = cells
    doc["run_s"] = round(time.perf_counter() - t_start, 1)
    changed = sorted(str(p) for p in Path("app").rglob("*.py") if p.stat().st_mtime > app_mtime_start)
    doc["app_code_changed_during_run"] = changed  # the in-process parts import the code once, at the start
    doc["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_catalogue-{args.tag}" if args.tag else "bench_catalogue"
    (args.out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")  # first: a report bug loses no run
    text = markdown(doc)
    (args.out / f"{stem}.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
