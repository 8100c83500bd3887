"""Index artifacts: manifest verification against corrupted and truncated files, dim and model mismatches,
the CURRENT pointer, and the model card check."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from app.artifacts.manifest import read_manifest, resolve_current, verify_files
from app.artifacts.verified import RACY_MARGIN_NS, VerifiedFiles
from app.engine.embedding import OnnxEmbedder
from app.errors import ArtifactError, ShardUnavailable
from app.service.config import Settings
from app.service.engines import load_engine
from tests.helpers import make_tiny_model


def _copy(index_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    dst = tmp_path / "index"
    shutil.copytree(index_dir, dst, copy_function=shutil.copyfile)  # writable copies: the tests damage them
    return dst, resolve_current(dst)


def _a_shard(version_dir: Path) -> Path:
    return version_dir / read_manifest(version_dir).categories[0].shard


@pytest.mark.parametrize("backend_index", ["faiss_index", "hnswlib_index", "sq8_index"])
def test_a_good_index_loads(backend_index: str, request: pytest.FixtureRequest, settings_for) -> None:  # type: ignore[no-untyped-def]
    engine = load_engine(settings_for(request.getfixturevalue(backend_index)))
    assert len(engine.shards) == 3 and engine.manifest.n_items == 18


def _corrupt(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only its hash can tell
    shard.write_bytes(bytes(data))


def test_corrupted_shard_is_refused_naming_file_and_hashes(faiss_index: Path, tmp_path: Path, settings_for) -> None:  # type: ignore[no-untyped-def]
    index, version = _copy(faiss_index, tmp_path)
    shard = _a_shard(version)
    _corrupt(shard)
    with pytest.raises(ArtifactError, match=r"sha256 expected [0-9a-f]{64}, got [0-9a-f]{64}") as err:
        load_engine(settings_for(index, verify_shards="before_ready"))
    assert shard.name in str(err.value)


def test_deferred_shards_are_hashed_before_their_first_read(faiss_index: Path, tmp_path: Path, settings_for) -> None:  # type: ignore[no-untyped-def]
    """verify_shards=background: the engine exists before any shard is hashed; the corrupt one is never read,
    its searches answer ShardUnavailable, the others answer, and the pass reports the file and both hashes."""
    index, version = _copy(faiss_index, tmp_path)
    shard = _a_shard(version)
    _corrupt(shard)
    engine = load_engine(settings_for(index, verify_shards="background"))
    assert engine.pending is not None and engine.pending.loaded == 0
    q = np.ones((1, engine.manifest.dim), np.float32) / np.sqrt(engine.manifest.dim)
    with pytest.raises(ShardUnavailable):
        engine.shards[0].index.search(q, 3)
    _, ids = engine.shards[1].index.search(q, 3)
    assert (ids >= 0).all() and engine.pending.loaded == 1
    with pytest.raises(ArtifactError, match=r"sha256 expected [0-9a-f]{64}, got [0-9a-f]{64}") as err:
        engine.pending.run()
    assert shard.name in str(err.value) and engine.pending.loaded == 2 and engine.pending.done.is_set()


def test_deferred_shards_search_as_verified_ones_from_many_threads(faiss_index: Path, settings_for) -> None:  # type: ignore[no-untyped-def]
    eager = load_engine(settings_for(faiss_index, verify_shards="before_ready"))
    lazy = load_engine(settings_for(faiss_index, verify_shards="background"))
    assert eager.pending is None and lazy.pending is not None
    q = np.random.default_rng(0).standard_normal((4, eager.manifest.dim)).astype(np.float32)
    # Eight threads ask every shard at once: each shard loads once, and answers as the eagerly loaded one.
    with ThreadPoolExecutor(8) as pool:
        lazy_out = list(pool.map(lambda i: lazy.shards[i % 3].index.search(q, 5), range(24)))
    for i, (scores, ids) in enumerate(lazy_out):
        want_scores, want_ids = eager.shards[i % 3].index.search(q, 5)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores)
    assert lazy.pending.loaded == 3
    lazy.pending.run()  # nothing left to do, and no error
    assert lazy.pending.failure is None


def test_fallback_to_previous_verifies_before_ready(faiss_index: Path, settings_for) -> None:  # type: ignore[no-untyped-def]
    # A shard refused after start could not fall back: with the fallback on, shards are verified first.
    engine = load_engine(settings_for(faiss_index, verify_shards="background", fallback_to_previous=True))
    assert engine.pending is None


def test_truncated_shard_is_refused_by_size(faiss_index: Path, tmp_path: Path, settings_for) -> None:  # type: ignore[no-untyped-def]
    index, version = _copy(faiss_index, tmp_path)
    shard = _a_shard(version)
    full = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: full // 2])
    with pytest.raises(ArtifactError, match=rf"size expected {full}, got {full // 2}"):
        load_engine(settings_for(index))


def test_missing_file_is_refused(faiss_index: Path, tmp_path: Path, settings_for) -> None:  # type: ignore[no-untyped-def]
    index, version = _copy(faiss_index, tmp_path)
    (version / "items.jsonl").unlink()
    with pytest.raises(ArtifactError, match=r"items\.jsonl: missing"):
        load_engine(settings_for(index))


def test_index_built_with_another_model_is_refused(faiss_index: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ArtifactError, match=r"model sha256 expected [0-9a-f]{64} \(served model\)"):
        load_engine(Settings(index_dir=faiss_index, model_dir=other))


def test_dim_mismatch_is_refused(faiss_index: Path, tmp_path: Path) -> None:
    index, version = _copy(faiss_index, tmp_path)
    wider = make_tiny_model(tmp_path / "wide", dim=24)
    # Pretend the index was built with this model, so the hash check passes and the dim check must catch it.
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["model"]["sha256"] = json.loads((wider / "model.json").read_text())["sha256"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="dim expected 24 \\(model\\), got 16"):
        load_engine(Settings(index_dir=index, model_dir=wider))


def test_model_hash_must_match_its_card(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m")
    card = json.loads((model / "model.json").read_text())
    card["sha256"] = "0" * 64
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match=r"sha256 expected 0{64} \(model\.json\), got"):
        OnnxEmbedder(model)


def test_model_dim_must_match_its_card(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m")
    card = json.loads((model / "model.json").read_text())
    card["output"]["dim"] = 99
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="output dim expected 99"):
        OnnxEmbedder(model)


@pytest.mark.parametrize("content", ["../../etc", "", "a/b"])
def test_current_must_name_a_version(tmp_path: Path, content: str) -> None:
    (tmp_path / "CURRENT").write_text(content)
    with pytest.raises(ArtifactError):
        resolve_current(tmp_path)


def test_build_publishes_a_complete_manifest(faiss_index: Path) -> None:
    version = resolve_current(faiss_index)
    manifest = read_manifest(version)
    listed = set(manifest.files)
    on_disk = {str(p.relative_to(version)) for p in version.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    assert manifest.build.images_total == 18 and manifest.build.images_failed == 0
    assert not list(faiss_index.glob(".building-*"))


# --- remembered verifications (app/artifacts/verified.py) -------------------------------------------------------------
def _hashed(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [r.hashed for r in caplog.records if r.getMessage() == "index files verified"]  # type: ignore[attr-defined]


def test_a_restart_does_not_rehash_unchanged_files_but_catches_a_rewrite(
    faiss_index: Path,
    tmp_path: Path,
    settings_for,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    index, version = _copy(faiss_index, tmp_path)
    n_files = len(read_manifest(version).files)
    time.sleep(RACY_MARGIN_NS / 1e9 + 0.2)  # the copies must be older than the racy margin to be remembered
    settings = settings_for(index, verify_cache_dir=tmp_path / "verified", verify_shards="before_ready")
    caplog.set_level(logging.INFO, logger="app.engine.assemble")
    load_engine(settings)
    load_engine(settings)
    assert _hashed(caplog) == [n_files, 0]
    assert (tmp_path / "verified" / f"{version.name}.json").is_file()

    # Rewritten in place with its size and mtime kept: the ctime still moves, so the file is hashed again.
    shard = _a_shard(version)
    before = shard.stat()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(ArtifactError, match=r"sha256 expected"):
        load_engine(settings)


def test_a_background_pass_is_remembered_once_every_shard_passed(
    faiss_index: Path,
    tmp_path: Path,
    settings_for,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    index, version = _copy(faiss_index, tmp_path)
    time.sleep(RACY_MARGIN_NS / 1e9 + 0.2)
    record = tmp_path / "verified" / f"{version.name}.json"
    lazy = settings_for(index, verify_cache_dir=tmp_path / "verified", verify_shards="background")
    engine = load_engine(lazy)
    assert engine.pending is not None and not record.exists()  # not before the shards passed
    engine.pending.run()
    assert record.is_file()
    caplog.set_level(logging.INFO, logger="app.engine.assemble")
    load_engine(settings_for(index, verify_cache_dir=tmp_path / "verified", verify_shards="before_ready"))
    assert _hashed(caplog) == [0]


def test_files_changed_within_the_racy_margin_are_not_remembered(faiss_index: Path, tmp_path: Path) -> None:
    _, version = _copy(faiss_index, tmp_path)  # just written: inside the margin
    manifest = read_manifest(version)
    record = tmp_path / "record.json"
    assert verify_files(version, manifest, VerifiedFiles(record)) == len(manifest.files)
    assert verify_files(version, manifest, VerifiedFiles(record)) == len(manifest.files)
    # With no margin the same files are remembered: what held them back was the margin alone.
    assert verify_files(version, manifest, VerifiedFiles(record, racy_margin_ns=0)) == len(manifest.files)
    assert verify_files(version, manifest, VerifiedFiles(record, racy_margin_ns=0)) == 0


@pytest.mark.parametrize("record_content", [b"{not json", b'{"format": 1, "files": {"router.npz": 3}}', b"\xff\xfe"])
def test_an_unreadable_record_means_hashing_again(faiss_index: Path, tmp_path: Path, record_content: bytes) -> None:
    _, version = _copy(faiss_index, tmp_path)
    manifest = read_manifest(version)
    record = tmp_path / "record.json"
    record.write_bytes(record_content)
    assert verify_files(version, manifest, VerifiedFiles(record, racy_margin_ns=0)) == len(manifest.files)
    assert verify_files(version, manifest, VerifiedFiles(record, racy_margin_ns=0)) == 0  # and it was rewritten


def test_a_record_for_other_bytes_is_not_trusted(faiss_index: Path, tmp_path: Path) -> None:
    """A record whose sha256 is not the manifest's (another build under the same version name) is ignored."""
    _, version = _copy(faiss_index, tmp_path)
    manifest = read_manifest(version)
    record = tmp_path / "record.json"
    verify_files(version, manifest, VerifiedFiles(record, racy_margin_ns=0))
    body = json.loads(record.read_text())
    for entry in body["files"].values():
        entry["sha256"] = "0" * 64
    record.write_text(json.dumps(body))
    assert verify_files(version, manifest, VerifiedFiles(record, racy_margin_ns=0)) == len(manifest.files)


def test_an_unwritable_record_location_still_loads(
    faiss_index: Path,
    tmp_path: Path,
    settings_for,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    index, _ = _copy(faiss_index, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    caplog.set_level(logging.INFO)
    time.sleep(RACY_MARGIN_NS / 1e9 + 0.2)
    engine = load_engine(settings_for(index, verify_cache_dir=blocker / "verified", verify_shards="before_ready"))
    assert engine.manifest.n_items == 18
    assert any(r.getMessage() == "verification not remembered" for r in caplog.records)


def test_item_rows_are_parsed_once_and_handed_out_as_copies(tmp_path: Path) -> None:
    from app.artifacts.items import ItemTable

    rows = [{"sku": f"s{i}", "category": "c", "attributes": {"n": i}} for i in range(5)]
    ItemTable.write(rows, tmp_path / "items.jsonl", tmp_path / "offsets.npy")
    table = ItemTable.load(tmp_path / "items.jsonl", tmp_path / "offsets.npy")
    first = table.get(3)
    first["sku"] = "changed by a caller"
    assert table.get(3) == rows[3]  # the cached row is not the caller's dict
    small = ItemTable.load(tmp_path / "items.jsonl", tmp_path / "offsets.npy", cached_rows=2)  # restarts often
    assert [small.get(i) for i in (0, 1, 2, 3, 4, 0, 4)] == [rows[i] for i in (0, 1, 2, 3, 4, 0, 4)]
