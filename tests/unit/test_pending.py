"""Shards verified after start (app/engine/pending.py): each is hashed before its loader runs, loaded once however
many threads ask, refused for good when its hash or its read fails, and a stopped pass leaves the rest."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.artifacts.manifest import IndexFiles, Manifest, read_manifest, resolve_current
from app.artifacts.shards import ShardIndex, load_shard
from app.engine.pending import PendingShard, PendingShards
from app.errors import ShardUnavailable


class CountingLoader:
    """The real faiss load, counted, and slow enough that concurrent callers overlap."""

    def __init__(self, manifest: Manifest, path: Path, delay_s: float = 0.05) -> None:
        self.manifest, self.path, self.delay_s = manifest, path, delay_s
        self.calls = 0

    def __call__(self) -> ShardIndex:
        self.calls += 1
        time.sleep(self.delay_s)
        return load_shard(self.manifest.backend, self.path, dim=self.manifest.dim, ef_search=32)


def _setup(faiss_index: Path, tmp_path: Path) -> tuple[IndexFiles, Manifest, Path]:
    index = tmp_path / "index"
    shutil.copytree(faiss_index, index, copy_function=shutil.copyfile)  # writable: some tests damage a shard
    version = resolve_current(index)
    manifest = read_manifest(version)
    return IndexFiles(version, manifest), manifest, version


def _pending(files: IndexFiles, manifest: Manifest, version: Path) -> tuple[list[PendingShard], list[CountingLoader]]:
    loaders = [CountingLoader(manifest, version / c.shard) for c in manifest.categories]
    shards = [
        PendingShard(files, c.shard, manifest.dim, c.n_vectors, loader)
        for c, loader in zip(manifest.categories, loaders, strict=True)
    ]
    return shards, loaders


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_many_threads_and_the_pass_load_each_shard_once(faiss_index: Path, tmp_path: Path) -> None:
    files, manifest, version = _setup(faiss_index, tmp_path)
    shards, loaders = _pending(files, manifest, version)
    q = np.ones((1, manifest.dim), np.float32) / np.sqrt(manifest.dim)
    passes = PendingShards(files, shards, threads=2)
    background = threading.Thread(target=passes.run)
    with ThreadPoolExecutor(8) as pool:
        background.start()
        answers = list(pool.map(lambda i: shards[i % len(shards)].search(q, 3)[1], range(24)))
    background.join(30)
    assert [loader.calls for loader in loaders] == [1] * len(shards)
    assert all((ids >= 0).all() for ids in answers) and passes.failure is None and passes.done.is_set()


def test_a_shard_whose_hash_fails_is_never_loaded(faiss_index: Path, tmp_path: Path) -> None:
    _, manifest, version = _setup(faiss_index, tmp_path)
    _flip(version / manifest.categories[0].shard)  # damaged before the start (after it: "changed while verified")
    files = IndexFiles(version, manifest)
    shards, loaders = _pending(files, manifest, version)
    for _ in range(3):  # refused once and for good: no second hash, never the loader
        with pytest.raises(ShardUnavailable):
            shards[0].ready()
    assert loaders[0].calls == 0
    assert shards[0].error is not None and "sha256 expected" in shards[0].error


@pytest.mark.parametrize("fault", ["unreadable", "faiss"])
def test_a_shard_that_cannot_be_read_is_refused_not_retried(faiss_index: Path, tmp_path: Path, fault: str) -> None:
    files, manifest, _ = _setup(faiss_index, tmp_path)
    entry = manifest.categories[0]
    calls: list[int] = []

    def broken() -> ShardIndex:
        calls.append(1)
        raise OSError(5, "Input/output error") if fault == "unreadable" else RuntimeError("faiss: bad header")

    shard = PendingShard(files, entry.shard, manifest.dim, entry.n_vectors, broken)
    passes = PendingShards(files, [shard])
    with pytest.raises(Exception, match="cannot be read"):
        passes.run()
    with pytest.raises(ShardUnavailable):
        shard.ready()
    assert calls == [1] and passes.failure is not None and "Input/output" not in passes.failure


def test_a_stopped_pass_leaves_the_remaining_shards_to_their_first_search(faiss_index: Path, tmp_path: Path) -> None:
    files, manifest, version = _setup(faiss_index, tmp_path)
    shards, loaders = _pending(files, manifest, version)
    passes = PendingShards(files, shards, threads=1)
    stop_after_first: Callable[[], ShardIndex] = loaders[0]

    def first_then_stop() -> ShardIndex:
        passes.stop()
        return stop_after_first()

    shards[0] = PendingShard(
        files, manifest.categories[0].shard, manifest.dim, manifest.categories[0].n_vectors, first_then_stop
    )
    passes.shards[0] = shards[0]
    passes.run()
    assert passes.done.is_set() and passes.loaded == 1
    assert [loader.calls for loader in loaders[1:]] == [0] * (len(shards) - 1)
    shards[1].ready()  # a search still verifies and loads it
    assert loaders[1].calls == 1


def test_a_watch_hears_each_shard_settle_loaded_or_refused(faiss_index: Path, tmp_path: Path) -> None:
    """What the service's vps_index_shards gauges read: (loaded, refused) now, then after each shard settles."""
    files, manifest, version = _setup(faiss_index, tmp_path)
    _flip(version / manifest.categories[1].shard)
    shards, _ = _pending(files, manifest, version)
    passes = PendingShards(files, shards, threads=1)
    heard: list[tuple[int, int]] = []
    passes.watch(lambda p: heard.append((p.loaded, p.refused)))
    shards[0].ready()
    with pytest.raises(ShardUnavailable):
        shards[1].ready()
    with pytest.raises(ShardUnavailable):
        shards[1].ready()  # refused for good: not heard again
    assert heard == [(0, 0), (1, 0), (1, 1)]
