"""`vps build-index --engine ray` on a real local Ray cluster (`ray start --head` on 127.0.0.1, started here): the
same index as the local engine, stored vectors reused, a killed worker retried, and a build whose workers keep
dying failing with one line and publishing nothing."""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from app.artifacts.manifest import read_manifest, resolve_current
from app.artifacts.shards import FaissHnswShard
from app.offline.datasets.catalogue import write_catalogue
from tests.helpers import encode, free_port, make_catalogue, make_tiny_model, product_image

VPS = [sys.executable, "-m", "app.cli"]
ACTOR_TITLE = "_EmbedActor"  # Ray names an actor's process ray::MapWorker(MapBatches(_EmbedActor))
BUILD_TIMEOUT_S = 300


def _require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ModuleNotFoundError:
        message = "ray is not installed (pip install -e '.[ray]'): the Ray build tests need it"
        if os.environ.get("VPS_REQUIRE_RAY") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A one-node Ray cluster on 127.0.0.1 (2 CPUs, a small object store), stopped with its processes after."""
    _require_ray()
    port = free_port()
    temp = tempfile.mkdtemp(prefix="vps-ray-", dir="/tmp")  # Ray's socket paths must stay short
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=false", "--object-store-memory=150000000", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _port_open(port):
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}")
        time.sleep(0.2)
    if not _port_open(port):
        pytest.fail("the Ray head did not open its port in 60 s")
    yield f"127.0.0.1:{port}"
    os.killpg(head.pid, signal.SIGTERM)
    try:
        head.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _build(catalogue: Path, model: Path, out: Path, *extra: str, address: str | None = None) -> subprocess.Popen[str]:
    args = [*VPS, "build-index", "--catalogue", str(catalogue), "--images-root", str(catalogue.parent),
            "--out", str(out), "--model", str(model), "--batch-size", "4", "--M", "8",
            "--ef-construction", "40"]  # fmt: skip
    if address is not None:
        args += ["--engine", "ray", "--ray-address", address, "--ray-workers", "2", "--ray-threads", "1"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([*args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _run(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=BUILD_TIMEOUT_S)
    return proc.returncode, out, err


def _comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest without what differs between two builds of the same content: names, times, the database's id
    (each build has its own), file hashes (a graph built from float-tolerant vectors); floats rounded."""
    m = {k: v for k, v in manifest.items() if k not in ("version", "created", "files", "catalogue_id")}
    m["categories"] = [{k: v for k, v in c.items() if k != "sha256"} for c in m["categories"]]
    rounded: dict[str, Any] = json.loads(json.dumps(m), parse_float=lambda x: round(float(x), 4))
    return rounded


def assert_same_index(a: Path, b: Path) -> None:
    va, vb = resolve_current(a), resolve_current(b)
    ma, mb = read_manifest(va), read_manifest(vb)
    assert _comparable(ma.model_dump(mode="json")) == _comparable(mb.model_dump(mode="json"))
    assert (va / "items.jsonl").read_bytes() == (vb / "items.jsonl").read_bytes()
    assert (va / "build_report.json").read_text() == (vb / "build_report.json").read_text()
    for ca, cb in zip(ma.categories, mb.categories, strict=True):
        xa = FaissHnswShard.load(va / ca.shard, ef_search=16).vectors()
        xb = FaissHnswShard.load(vb / cb.shard, ef_search=16).vectors()
        np.testing.assert_allclose(xa, xb, atol=1e-5)


def _raw_tracebacks(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("Traceback")]


def _logged(stderr: str, msg: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [x for x in lines if x.get("msg") == msg]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


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
    ray_address: str, flawed_catalogue: Path, model: Path, tmp_path: Path
) -> None:
    code, _, local_err = _run(_build(flawed_catalogue, model, tmp_path / "local", "--max-failed-images", "0.5"))
    assert code == 0, local_err
    code, out, err = _run(
        _build(flawed_catalogue, model, tmp_path / "ray", "--max-failed-images", "0.5", address=ray_address)
    )
    assert code == 0, err
    assert_same_index(tmp_path / "local", tmp_path / "ray")
    # The missing file fails on the driver (hashing), the corrupt one on a Ray worker: both reported as locally.
    skipped = [ln.strip() for ln in err.splitlines() if ln.strip().startswith("skipped line")]
    assert skipped == [ln.strip() for ln in local_err.splitlines() if ln.strip().startswith("skipped line")]
    assert sorted(ln.split(": ")[1] for ln in skipped) == ["img/corrupt.jpg", "img/missing.jpg"]
    assert "2 images skipped" in out
    assert not _raw_tracebacks(err)


def test_a_ray_rebuild_embeds_only_new_images(ray_address: str, tmp_path: Path, model: Path) -> None:
    root = tmp_path / "cat"
    catalogue = make_catalogue(root, per_sku=2)
    code, _, err = _run(_build(catalogue, model, tmp_path / "idx", address=ray_address))
    assert code == 0, err
    first = _logged(err, "catalogue embedded")
    assert first and first[0]["reused"] == 0 and first[0]["embedded"] == 12
    rows = _rows(catalogue)
    (root / "img" / "extra.jpg").write_bytes(encode(product_image(rows[0]["sku"], 9)))
    write_catalogue(catalogue, [*rows, {**rows[0], "image": "img/extra.jpg"}])
    code, _, err = _run(_build(catalogue, model, tmp_path / "idx", address=ray_address))
    assert code == 0, err
    again = _logged(err, "catalogue embedded")
    assert again and again[0]["reused"] == 12 and again[0]["embedded"] == 1


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


def _actor_pids() -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(ACTOR_TITLE in part for part in p.info["cmdline"] or []):
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def _kill_actors(build: subprocess.Popen[str], *, once: bool, settle_s: float = 2.0) -> int:
    """SIGKILL embedding actors while the build runs: the first one seen alive for `settle_s` (past its start),
    or (once=False) every one that appears. Returns how many were killed; bounded by the build's timeout."""
    killed = 0
    seen: dict[int, float] = {}
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    while build.poll() is None and time.monotonic() < deadline:
        now = time.monotonic()
        for pid in _actor_pids():
            seen.setdefault(pid, now)
            if now - seen[pid] >= (settle_s if once else 0.0):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                killed += 1
                if once:
                    return killed
        time.sleep(0.1)
    return killed


def test_a_killed_ray_worker_is_retried_and_the_build_completes(
    ray_address: str, slow_catalogue: Path, model: Path, tmp_path: Path
) -> None:
    build = _build(slow_catalogue, model, tmp_path / "ray", address=ray_address)
    killed = _kill_actors(build, once=True)
    code, _, err = _run(build)
    assert killed == 1, "the build ended before a worker could be killed: make the catalogue slower"
    assert code == 0, err
    code, _, err = _run(_build(slow_catalogue, model, tmp_path / "local"))
    assert code == 0, err
    assert_same_index(tmp_path / "local", tmp_path / "ray")


def test_workers_dying_past_their_retries_fail_the_build_with_one_line_and_publish_nothing(
    ray_address: str, slow_catalogue: Path, model: Path, tmp_path: Path
) -> None:
    out_dir = tmp_path / "idx"
    code, _, err = _run(_build(slow_catalogue, model, out_dir))
    assert code == 0, err
    current = (out_dir / "CURRENT").read_text()
    versions = sorted(p.name for p in out_dir.iterdir())
    other = make_tiny_model(tmp_path / "other", seed=1)  # no stored vectors: every image is embedded again
    build = _build(slow_catalogue, other, out_dir, "--ray-retries", "0", address=ray_address)
    killed = _kill_actors(build, once=False)
    code, out, err = _run(build)
    assert killed >= 1
    assert code == 7, (out, err)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Ray embedding failed" in errors[0], err
    assert not _raw_tracebacks(err)  # Ray's own (logged at error level) travel inside one JSON line each
    assert (out_dir / "CURRENT").read_text() == current
    assert sorted(p.name for p in out_dir.iterdir()) == versions  # no staging directory, no new version
