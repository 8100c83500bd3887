"""`vps build-index --engine ray` on a real local Ray cluster (`ray start --head` on 127.0.0.1, started here): the
same index as the local engine (faiss and hnswlib shards, and `vps compact` after a model change), stored vectors
reused, a killed worker's work retried, a build whose workers keep dying failing with one line
and publishing nothing, an unreachable cluster failing with one line, and --ray-address refused without --engine
ray."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.artifacts.manifest import read_manifest, resolve_current
from app.artifacts.shards import FaissHnswSq8Shard, load_shard
from app.offline.datasets.catalogue import write_catalogue
from tests.helpers import encode, free_port, make_catalogue, make_tiny_model, product_image

VPS = [sys.executable, "-m", "app.cli"]
ACTOR_TITLE = "_EmbedActor"  # Ray names an actor's process ray::MapWorker(MapBatches(_EmbedActor))
BUILD_TIMEOUT_S = 300
RAY_WORKERS = 2  # embedding actors of a Ray build here, 1 CPU each: the cluster's 2 CPUs


@dataclass(frozen=True)
class RayCluster:
    address: str  # 127.0.0.1:PORT, for --ray-address
    pid: int  # the `ray start --head --block` process: every process of the cluster descends from it


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        message = "ray is not installed (pip install -e '.[ray]'): the Ray build tests need it"
        if os.environ.get("VPS_REQUIRE_RAY") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs, a small object store), stopped with its processes after,
    even when it fails to start."""
    _require_ray()
    port = free_port()
    temp = tempfile.mkdtemp(prefix="vps-ray-", dir="/tmp")  # Ray's socket paths must stay short
    ray_bin = Path(sys.executable).with_name("ray")
    head: subprocess.Popen[bytes] | None = None
    try:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=150000000", f"--temp-dir={temp}",
             "--disable-usage-stats"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            # No drain on SIGTERM: once a job has run, Ray 2.60's head waits out its 30 s drain timeout.
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _port_open(port):
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}")
            time.sleep(0.2)
        if not _port_open(port):
            pytest.fail("the Ray head did not open its port in 60 s")
        yield RayCluster(f"127.0.0.1:{port}", head.pid)
    finally:
        if head is not None:
            _stop_group(head)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(head: subprocess.Popen[bytes]) -> None:
    """SIGTERM the head alone (it stops its own processes in order; a SIGTERM to the whole group would stop the GCS
    under it, and the head then waits 30 s for the dead GCS), then SIGKILL whatever is left in its process group
    (its own session): the head if it did not stop in 30 s, and anything that outlived it."""
    head.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=30)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _vps(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **(env or {})}
    return subprocess.Popen([*VPS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _build(
    catalogue: Path, model: Path, out: Path, *extra: str, address: str | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    args = ["build-index", "--catalogue", str(catalogue), "--images-root", str(catalogue.parent),
            "--out", str(out), "--model", str(model), "--batch-size", "4", "--M", "8",
            "--ef-construction", "40"]  # fmt: skip
    if address is not None:
        args += ["--engine", "ray", "--ray-address", address, "--ray-workers", str(RAY_WORKERS), "--ray-threads", "1"]
    return _vps([*args, *extra], env)


def _run(proc: subprocess.Popen[str], timeout_s: float = BUILD_TIMEOUT_S) -> tuple[int, str, str]:
    """The command's exit code, stdout and stderr; killed, and the test failed, when it outlasts `timeout_s`."""
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        tail = "\n".join(err.splitlines()[-30:])
        command = " ".join(map(str, proc.args)) if isinstance(proc.args, list) else str(proc.args)
        pytest.fail(f"{command} did not end in {timeout_s} s (killed); stderr's tail:\n{tail}")
    return proc.returncode, out, err


def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest without what differs between two builds of the same content: names, times, the database's id
    (each build has its own), file hashes (a graph built from float-tolerant vectors); floats rounded."""
    m = {k: v for k, v in manifest.items() if k not in ("version", "created", "files", "catalogue_id")}
    m["categories"] = [{k: v for k, v in c.items() if k != "sha256"} for c in m["categories"]]
    rounded: dict[str, Any] = json.loads(json.dumps(m), parse_float=lambda x: round(float(x), 4))
    return rounded


def assert_same_index(a: Path, b: Path) -> None:
    """The same manifest (but names, times, hashes), items, build report and shard vectors (either backend)."""
    va, vb = resolve_current(a), resolve_current(b)
    ma, mb = read_manifest(va), read_manifest(vb)
    assert _comparable(ma.model_dump(mode="json")) == _comparable(mb.model_dump(mode="json"))
    assert (va / "items.jsonl").read_bytes() == (vb / "items.jsonl").read_bytes()
    assert (va / "build_report.json").read_text() == (vb / "build_report.json").read_text()
    for ca, cb in zip(ma.categories, mb.categories, strict=True):
        xa = load_shard(ma.backend, va / ca.shard, dim=ma.dim, ef_search=16).vectors()
        xb = load_shard(mb.backend, vb / cb.shard, dim=mb.dim, ef_search=16).vectors()
        assert len(xa) == ca.n_vectors
        np.testing.assert_allclose(xa, xb, atol=1e-5)


def _raw_tracebacks(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("Traceback")]


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def _logged(stderr: str, msg: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [x for x in lines if x.get("msg") == msg]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _published(out_dir: Path) -> list[str]:
    """What a build leaves in its --out directory but the catalogue database (CURRENT, versions, staging)."""
    return (
        sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("catalogue.db")) if out_dir.exists() else []
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def flawed_catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test catalogue plus a corrupt image and a missing one (each its own SKU's second image)."""
    root = tmp_path_factory.mktemp("flawed")
    catalogue = make_catalogue(root, per_sku=4)
    (root / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows = _rows(catalogue)
    sku, category = rows[0]["sku"], rows[0]["category"]
    rows += [
        {"sku": sku, "category": category, "image": "img/corrupt.jpg", "title": sku},
        {"sku": sku, "category": category, "image": "img/missing.jpg", "title": sku},
    ]
    write_catalogue(catalogue, rows)
    return catalogue


def test_ray_build_equals_the_local_build_and_reports_bad_images_alike(
    ray_cluster: RayCluster, flawed_catalogue: Path, model: Path, tmp_path: Path
) -> None:
    code, _, local_err = _run(_build(flawed_catalogue, model, tmp_path / "local", "--max-failed-images", "0.5"))
    assert code == 0, local_err
    code, out, err = _run(
        _build(flawed_catalogue, model, tmp_path / "ray", "--max-failed-images", "0.5", address=ray_cluster.address)
    )
    assert code == 0, err
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    # The missing file fails on the driver (hashing), the corrupt one on a Ray worker: both reported as locally.
    skipped = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("skipped line")]
    assert skipped == [ln.strip() for ln in local_err.splitlines() if ln.strip().startswith("skipped line")]
    assert sorted(ln.split(": ")[1] for ln in skipped) == ["img/corrupt.jpg", "img/missing.jpg"]
    assert "2 images skipped" in out
    assert not _raw_tracebacks(err)


def test_a_ray_rebuild_embeds_only_new_images(ray_cluster: RayCluster, tmp_path: Path, model: Path) -> None:
    root = tmp_path / "cat"
    catalogue = make_catalogue(root, per_sku=2)
    code, _, err = _run(_build(catalogue, model, tmp_path / "idx", address=ray_cluster.address))
    assert code == 0, err
    first = _logged(err, "catalogue embedded")
    assert first and first[0]["reused"] == 0 and first[0]["embedded"] == 12
    rows = _rows(catalogue)
    (root / "img" / "extra.jpg").write_bytes(encode(product_image(rows[0]["sku"], 9)))
    write_catalogue(catalogue, [*rows, {**rows[0], "image": "img/extra.jpg"}])
    code, _, err = _run(_build(catalogue, model, tmp_path / "idx", address=ray_cluster.address))
    assert code == 0, err
    again = _logged(err, "catalogue embedded")
    assert again and again[0]["reused"] == 12 and again[0]["embedded"] == 1


def test_hnswlib_shards_built_on_ray_equal_the_local_ones(ray_cluster: RayCluster, tmp_path: Path, model: Path) -> None:
    catalogue = make_catalogue(tmp_path / "cat", per_sku=2)
    code, _, err = _run(_build(catalogue, model, tmp_path / "local", "--backend", "hnswlib"))
    assert code == 0, err
    build = _build(catalogue, model, tmp_path / "ray", "--backend", "hnswlib", address=ray_cluster.address)
    actors = _watch_actors(build, ray_cluster)
    code, _, err = _run(build)
    assert code == 0, err
    assert actors, "no embedding actor ran on the cluster"
    assert read_manifest(resolve_current(tmp_path / "ray")).backend == "hnswlib"
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def test_a_build_on_its_own_ray_cluster_with_compressed_shards_equals_the_local_one(
    tmp_path: Path, model: Path
) -> None:
    """No --ray-address: the build starts a cluster of its own (and stops it), and its shard tasks build the
    compressed backend with the rescore factor asked for."""
    _require_ray()
    catalogue = make_catalogue(tmp_path / "cat", per_sku=2)
    sq8 = ("--backend", "faiss-sq8", "--rescore-factor", "3")
    code, _, err = _run(_build(catalogue, model, tmp_path / "local", *sq8))
    assert code == 0, err
    own = ("--engine", "ray", "--ray-workers", "1", "--ray-threads", "1")
    code, _, err = _run(_build(catalogue, model, tmp_path / "ray", *sq8, *own))
    assert code == 0, err
    manifest = read_manifest(resolve_current(tmp_path / "ray"))
    assert (manifest.backend, manifest.build.rescore_factor) == ("faiss-sq8", 3)
    shard = load_shard(manifest.backend, resolve_current(tmp_path / "ray") / manifest.categories[0].shard,
                       dim=manifest.dim, ef_search=16)  # fmt: skip
    assert isinstance(shard, FaissHnswSq8Shard) and shard.rescore_factor == 3  # as built on the worker
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    assert not _raw_tracebacks(err)


def test_compact_after_a_model_change_on_ray_equals_the_local_compact(
    ray_cluster: RayCluster, tmp_path: Path, model: Path
) -> None:
    """A catalogue imported (into the SQLite database beside the index) with one model, then `vps compact` with
    another: every stored vector is embedded again, from the images root, on Ray as locally."""
    catalogue = make_catalogue(tmp_path / "cat", per_sku=2)
    imported = tmp_path / "imported"
    code, _, err = _run(_build(catalogue, model, imported))
    assert code == 0, err
    other = make_tiny_model(tmp_path / "other", seed=1)
    compact = ["compact", "--model", str(other), "--images-root", str(catalogue.parent)]
    for name in ("local", "ray"):
        shutil.copytree(imported, tmp_path / name)  # the same database and live version for both
    code, _, err = _run(_vps([*compact, "--out", str(tmp_path / "local")]))
    assert code == 0, err
    ray_args = ["--engine", "ray", "--ray-address", ray_cluster.address, "--ray-workers", str(RAY_WORKERS)]
    build = _vps([*compact, "--out", str(tmp_path / "ray"), *ray_args])
    actors = _watch_actors(build, ray_cluster)
    code, out, err = _run(build)
    assert code == 0, err
    assert actors, "no embedding actor ran on the cluster"
    assert out.count("built ") == 1 and not _raw_tracebacks(err)
    manifest = read_manifest(resolve_current(tmp_path / "ray"))
    assert manifest.model.sha256 == json.loads((other / "model.json").read_text())["sha256"]
    assert manifest.n_items == 12 and resolve_current(tmp_path / "ray") != resolve_current(imported)
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def test_an_unreachable_ray_cluster_fails_the_build_with_one_line_and_publishes_nothing(
    tmp_path: Path, model: Path
) -> None:
    """Nothing listens at the address: exit 7 (EngineFailed), one `error:` line, nothing published, within the
    bound the engine sets (ray_engine.RAY_CONNECT_ENV: about 30 s; Ray's own default is about 14 minutes)."""
    _require_ray()
    catalogue = make_catalogue(tmp_path / "cat", per_sku=1)
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    code, out, err = _run(_build(catalogue, model, tmp_path / "idx", address=address), 120)
    assert code == 7, (out, err)
    errors = _errors(err)
    assert len(errors) == 1 and "cannot be reached" in errors[0], err
    assert not _raw_tracebacks(err)
    assert _published(tmp_path / "idx") == []
    assert time.monotonic() - started < 90


def test_ray_address_without_the_ray_engine_is_a_usage_error(tmp_path: Path, model: Path) -> None:
    """No cluster needed: the option is refused (exit 2) before any engine starts."""
    catalogue = make_catalogue(tmp_path / "cat", per_sku=1)
    code, out, err = _run(_build(catalogue, model, tmp_path / "idx", "--ray-address", "127.0.0.1:1"), 60)
    assert code == 2, (out, err)
    assert "--ray-address" in err and "--engine ray" in err, err
    assert not _raw_tracebacks(err)
    assert not (tmp_path / "idx").exists()  # refused before --out or its database is made


def _slow_catalogue(root: Path, n: int = 300) -> Path:
    """Large PNGs (costly to decode): embedding lasts long enough to kill a worker in the middle of it."""
    from PIL import Image

    rows = []
    y, x = np.mgrid[0:1000, 0:1000]
    for i in range(n):
        sku = f"sku-{i % 10}"
        arr = np.stack([(x + i) % 256, (y * (i % 10 + 1)) % 256, (x + y) % 256], axis=-1).astype(np.uint8)
        rel = f"img/{i}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(encode(Image.fromarray(arr, "RGB"), "PNG"))
        rows.append({"sku": sku, "category": f"cat-{i % 3}", "image": rel, "title": sku})
    path = root / "catalogue.csv"
    write_catalogue(path, rows)
    return path


@pytest.fixture(scope="module")
def slow_catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _slow_catalogue(tmp_path_factory.mktemp("slow"))


def _actor_pids(cluster: RayCluster) -> set[int]:
    """Embedding actors of this test's cluster (descendants of its head process), not any on the host."""
    import psutil

    try:
        descendants = psutil.Process(cluster.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return set()
    pids = set()
    for p in descendants:
        try:
            if any(ACTOR_TITLE in part for part in p.cmdline()):
                pids.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return pids


def _watch_actors(build: subprocess.Popen[str], cluster: RayCluster, seen: set[int] | None = None) -> set[int]:
    """The embedding actors seen while the build runs (bounded by the build's timeout)."""
    seen = set() if seen is None else seen
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while build.poll() is None and time.monotonic() < deadline:
        seen |= _actor_pids(cluster)
        time.sleep(0.1)
    return seen


def _kill_first_actor(
    build: subprocess.Popen[str], cluster: RayCluster, pool: int = RAY_WORKERS, settle_s: float = 2.0
) -> set[int]:
    """SIGKILL an embedding actor while the build runs, once the whole pool (`pool` actors) is up and one of them
    has been alive for `settle_s` (past its start), so the kill lands mid-build. Returns
    the actors seen up to the kill (empty: the build ended before one could be killed)."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while build.poll() is None and time.monotonic() < deadline:
        now = time.monotonic()
        alive = _actor_pids(cluster)
        for pid in alive:
            seen.setdefault(pid, now)
        settled = [pid for pid in alive if now - seen[pid] >= settle_s]
        if len(alive) >= pool and settled:
            with contextlib.suppress(ProcessLookupError):
                os.kill(settled[0], signal.SIGKILL)
                return set(seen) | _actor_pids(cluster)
        time.sleep(0.1)
    return set()


def _kill_every_actor(build: subprocess.Popen[str], cluster: RayCluster) -> int:
    """SIGKILL every embedding actor as it appears while the build runs. Returns how many were killed."""
    killed = 0
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while build.poll() is None and time.monotonic() < deadline:
        for pid in _actor_pids(cluster):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed += 1
        time.sleep(0.1)
    return killed


def test_a_killed_ray_worker_is_replaced_or_its_work_retried_and_the_build_completes(
    ray_cluster: RayCluster, slow_catalogue: Path, model: Path, tmp_path: Path
) -> None:
    """An embedding actor is SIGKILLed mid-build (the build still running). Ray either restarts it or lets the
    surviving actor take its blocks: which one depends on timing (a CI run saw the build finish on the survivor
    before any replacement came up), so a new process is not required. What is: the build completes and its
    index equals the local engine's, so no image was lost or embedded twice."""
    build = _build(slow_catalogue, model, tmp_path / "ray", address=ray_cluster.address)
    before = _kill_first_actor(build, ray_cluster)
    assert before, "the build ended before a worker could be killed: make the catalogue slower"
    assert build.poll() is None, "the build ended at the kill: make the catalogue slower"
    code, _, err = _run(build)
    assert code == 0, err
    code, _, err = _run(_build(slow_catalogue, model, tmp_path / "local"))
    assert code == 0, err
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def test_workers_dying_past_their_retries_fail_the_build_with_one_line_and_publish_nothing(
    ray_cluster: RayCluster, slow_catalogue: Path, model: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "idx"
    code, _, err = _run(_build(slow_catalogue, model, out_dir))
    assert code == 0, err
    current = (out_dir / "CURRENT").read_text()
    versions = sorted(p.name for p in out_dir.iterdir())
    other = make_tiny_model(tmp_path / "other", seed=1)  # no stored vectors: every image is embedded again
    build = _build(slow_catalogue, other, out_dir, "--ray-retries", "0", address=ray_cluster.address)
    killed = _kill_every_actor(build, ray_cluster)
    code, out, err = _run(build)
    assert killed >= 1
    assert code == 7, (out, err)
    errors = _errors(err)
    assert len(errors) == 1 and "Ray embedding failed" in errors[0], err
    assert not _raw_tracebacks(err)  # Ray's own (logged at error level) travel inside one JSON line each
    assert (out_dir / "CURRENT").read_text() == current
    assert sorted(p.name for p in out_dir.iterdir()) == versions  # no staging directory, no new version
