"""What a broken node does at start: a metrics directory that cannot hold the workers' files stops `vps serve`
once with one line naming it (never a crash loop), and a version damaged under a running server (a truncated
shard) is refused at the next start, or replaced by the newest earlier version that verifies when configured to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.artifacts.manifest import read_manifest, resolve_current
from app.offline.build.build_index import BuildOptions, build_index
from tests.helpers import free_port, wait_until_up

VPS = str(Path(sys.executable).with_name("vps"))


def _env(index_dir: Path, model_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {
        **env,
        "VPS_INDEX_DIR": str(index_dir),
        "VPS_MODEL_DIR": str(model_dir),
        "VPS_WARMUP_QUERIES": "0",
        **extra,
    }


@pytest.fixture
def full_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, filled: what a node's emptyDir or /tmp looks like when something else filled it."""
    mount = tmp_path / "full"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); run as root to test a full filesystem")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        with (mount / "filler").open("wb") as fh:
            try:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
            except OSError:
                pass
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_full_metrics_directory_stops_serve_once_naming_it(
    full_filesystem: Path, faiss_index: Path, tiny_model: Path, workers: str
) -> None:
    metrics = full_filesystem / "metrics"
    env = _env(faiss_index, tiny_model, PROMETHEUS_MULTIPROC_DIR=str(metrics))
    t0 = time.monotonic()
    r = subprocess.run(
        [VPS, "serve", "--port", str(free_port()), "--workers", workers],
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 3, r.stderr.decode()[-2000:]
    assert time.monotonic() - t0 < 30  # it fails once, it does not keep restarting workers
    lines = [line for line in r.stderr.decode().splitlines() if "cannot start" in line]
    assert len(lines) == 1 and str(metrics) in lines[0] and "PROMETHEUS_MULTIPROC_DIR" in lines[0]


def test_an_unwritable_metrics_directory_stops_serve_naming_it(
    tmp_path: Path, faiss_index: Path, tiny_model: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    env = _env(faiss_index, tiny_model, PROMETHEUS_MULTIPROC_DIR=str(blocker / "metrics"))
    r = subprocess.run(
        [VPS, "serve", "--port", str(free_port()), "--workers", "2"], env=env, capture_output=True, timeout=60
    )
    assert r.returncode == 3 and f"metrics directory {blocker / 'metrics'}" in r.stderr.decode()


@contextmanager
def _serving(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [VPS, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_up(base, timeout_s=60), "vps serve never answered /healthz"
        yield base, proc
    finally:
        proc.kill()
        proc.wait()


def _two_versions(faiss_index: Path, catalogue: Path, tiny_model: Path, tmp_path: Path) -> tuple[Path, str, Path]:
    """A copy of the index with a second, newer version published (a different M: other content)."""
    index = tmp_path / "index"
    shutil.copytree(faiss_index, index, copy_function=shutil.copyfile)
    first = resolve_current(index).name
    build_index(catalogue, catalogue.parent, index, tiny_model, BuildOptions(M=12, ef_construction=40, progress=False))
    second = resolve_current(index)
    assert second.name != first
    return index, first, second


def _truncate_a_shard(version: Path) -> Path:
    shard = version / read_manifest(version).categories[0].shard
    assert shard.stat().st_mode & 0o222 == 0, "published files are read-only"
    shard.chmod(0o644)  # what an operator has to do first: the rule is documented, the mistake still happens
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard


def test_a_damaged_version_is_not_served_after_a_restart(
    faiss_index: Path, catalogue: Path, tiny_model: Path, tmp_path: Path
) -> None:
    index, _, second = _two_versions(faiss_index, catalogue, tiny_model, tmp_path)
    shard = _truncate_a_shard(second)
    with _serving(_env(index, tiny_model)) as (base, proc):
        r = httpx.get(f"{base}/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        proc.kill()
        log = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "index version refused" in log and str(shard.name) in log


def test_with_fallback_the_newest_earlier_version_that_verifies_is_served(
    faiss_index: Path, catalogue: Path, tiny_model: Path, tmp_path: Path
) -> None:
    index, first, second = _two_versions(faiss_index, catalogue, tiny_model, tmp_path)
    _truncate_a_shard(second)
    with _serving(_env(index, tiny_model, VPS_FALLBACK_TO_PREVIOUS="true")) as (base, proc):
        assert httpx.get(f"{base}/readyz").status_code == 200
        assert httpx.get(f"{base}/v1/info").json()["index"]["version"] == first
        proc.kill()
        log = proc.stderr.read().decode()  # type: ignore[union-attr]
    assert "serving the newest earlier version that verifies" in log
