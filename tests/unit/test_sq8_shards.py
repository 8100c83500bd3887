"""The compressed shard (faiss-sq8): HNSW over 8-bit codes, re-scored exactly from the float vectors in the same
memory-mapped file. Its scores are exact inner products, its recall close to the float graph's, filters and
row reads work as on the float shard (served end to end: tests/http/test_sq8_index.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.artifacts.shards import FaissHnswShard, FaissHnswSq8Shard, build_shard, load_shard
from app.errors import ArtifactError

K = 10


def _clustered(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in tight clusters (embedding-like: near neighbours close together), and queries near them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n // 20, dim)).astype(np.float32)
    x = centres[np.arange(n) % len(centres)] + 0.35 * rng.normal(size=(n, dim)).astype(np.float32)
    q = centres[rng.integers(0, len(centres), 200)] + 0.35 * rng.normal(size=(200, dim)).astype(np.float32)
    return _unit(x), _unit(q)


def _unit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def _recall(ids: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(ids.tolist(), truth.tolist(), strict=True)]))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Path, Path]:
    x, q = _clustered(6000, 64, seed=0)
    tmp = tmp_path_factory.mktemp("sq8")
    build_shard("faiss-sq8", x, tmp / "s.sq8.faiss", M=16, ef_construction=80, rescore_factor=4)
    build_shard("faiss", x, tmp / "s.faiss", M=16, ef_construction=80)
    return x, q, tmp / "s.sq8.faiss", tmp / "s.faiss"


def test_scores_are_exact_inner_products_and_recall_matches_the_float_graph(
    data: tuple[np.ndarray, np.ndarray, Path, Path],
) -> None:
    x, q, sq8_path, flat_path = data
    truth = np.argsort(-(q @ x.T), axis=1)[:, :K]
    sq8 = load_shard("faiss-sq8", sq8_path, dim=64, ef_search=64)
    flat = load_shard("faiss", flat_path, dim=64, ef_search=64)
    scores, ids = sq8.search(q, K)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q, x[ids]), atol=1e-5)  # re-scored: exact
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first
    r_sq8, r_flat = _recall(ids, truth), _recall(flat.search(q, K)[1], truth)
    assert r_flat > 0.9
    assert r_sq8 >= r_flat - 0.02, (r_sq8, r_flat)


def test_rescoring_is_what_recovers_recall(data: tuple[np.ndarray, np.ndarray, Path, Path]) -> None:
    """With factor 1 the candidates are the codes' own top k (scores still exact); more candidates, more recall."""
    x, q, sq8_path, _ = data
    truth = np.argsort(-(q @ x.T), axis=1)[:, :K]
    shard = FaissHnswSq8Shard.load(sq8_path, ef_search=64)
    assert shard.rescore_factor == 4  # as built
    recalls = {}
    for factor in (1, 4):
        shard.set_rescore_factor(factor)
        recalls[factor] = _recall(shard.search(q, K)[1], truth)
    assert recalls[4] > recalls[1], recalls


def test_factor_zero_ranks_by_the_codes_and_reads_no_float_row(
    data: tuple[np.ndarray, np.ndarray, Path, Path], tmp_path: Path
) -> None:
    """A copy whose float vectors are zeroed: factor 0 answers as from the intact file (it never reads them),
    with scores close to the exact ones; factor 1 reads them (every score 0)."""
    x, q, sq8_path, _ = data
    blank = tmp_path / "blank.sq8.faiss"
    raw = bytearray(sq8_path.read_bytes())
    start = len(raw) - 4 - x.size * 4  # faiss writes the float vectors last, then k_factor (one float)
    raw[start : start + x.size * 4] = bytes(x.size * 4)
    blank.write_bytes(bytes(raw))
    intact, zeroed = (FaissHnswSq8Shard.load(p, ef_search=64) for p in (sq8_path, blank))
    for shard in (intact, zeroed):
        shard.set_rescore_factor(0)
    s_intact, i_intact = intact.search(q, K)
    s_zeroed, i_zeroed = zeroed.search(q, K)
    np.testing.assert_array_equal(i_intact, i_zeroed)
    np.testing.assert_array_equal(s_intact, s_zeroed)
    np.testing.assert_allclose(s_intact, np.einsum("qd,qkd->qk", q, x[i_intact]), atol=0.02)  # 8-bit codes
    truth = np.argsort(-(q @ x.T), axis=1)[:, :K]
    assert _recall(i_intact, truth) > 0.9
    zeroed.set_rescore_factor(1)
    assert np.allclose(zeroed.search(q, K)[0], 0.0)
    with pytest.raises(ValueError, match="rescore factor"):
        zeroed.set_rescore_factor(-1)


def test_rows_vectors_and_filters_read_the_float_vectors(data: tuple[np.ndarray, np.ndarray, Path, Path]) -> None:
    x, q, sq8_path, _ = data
    shard = FaissHnswSq8Shard.load(sq8_path, ef_search=64)
    assert shard.ntotal == len(x) and shard.dim == x.shape[1]
    np.testing.assert_array_equal(shard.vectors(), x)
    np.testing.assert_array_equal(shard.rows(np.array([5, 0, 77])), x[[5, 0, 77]])
    allowed = np.zeros(len(x), bool)
    allowed[::7] = True
    scores, ids = shard.search_subset(q[:20], K, allowed, ef_search=128)
    assert (ids >= 0).all() and allowed[ids].all()
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", q[:20], x[ids]), atol=1e-5)
    truth = np.argsort(-(q[:20] @ x[allowed].T), axis=1)[:, :K]
    assert _recall(np.flatnonzero(allowed)[truth], ids) >= 0.9  # the filtered walk still finds the best rows


def test_a_float_shard_is_not_read_as_a_compressed_one(data: tuple[np.ndarray, np.ndarray, Path, Path]) -> None:
    _, _, sq8_path, flat_path = data
    with pytest.raises(ArtifactError, match="expected a re-scored SQ8 index"):
        FaissHnswSq8Shard.load(flat_path, ef_search=16)
    with pytest.raises(ArtifactError, match="expected an HNSW index"):
        FaissHnswShard.load(sq8_path, ef_search=16)


def test_the_shard_is_memory_mapped(data: tuple[np.ndarray, np.ndarray, Path, Path]) -> None:
    """Loaded with the mmap flag, the float vectors are pages of the shard file itself (not a copy)."""
    _, _, sq8_path, _ = data
    shard = FaissHnswSq8Shard.load(sq8_path, ef_search=16)
    stored = shard._stored()  # the zero-copy view itself
    # The floats' pages are the shard file's, mapped by faiss with MADV_RANDOM (smaps VmFlags "rr": no
    # read-around), so a re-scored row not in the page cache costs its own page, not a read-ahead window:
    # the cold figures of docs/bench/bench_compressed.md rely on it.
    mapping = _mapping_of(stored.__array_interface__["data"][0])
    assert mapping["path"] == str(sq8_path.resolve())
    assert "rr" in mapping["VmFlags"].split(), mapping


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry holding `address`: its path and fields."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(v, 16) for v in head[0].split("-"))
            entry = {"path": head[5] if len(head) > 5 else ""} if lo <= address < hi else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
            if key == "VmFlags":
                return entry
    raise AssertionError(f"no mapping holds {address:#x}")


def test_concurrent_searches_of_one_shard_agree_with_one_by_one(
    data: tuple[np.ndarray, np.ndarray, Path, Path],
) -> None:
    """The service's threads share a shard: parameters made per k on first use must not mix up answers."""
    from concurrent.futures import ThreadPoolExecutor

    _, q, sq8_path, _ = data
    shard = FaissHnswSq8Shard.load(sq8_path, ef_search=64)
    ks = (10, 64, 7)
    alone = FaissHnswSq8Shard.load(sq8_path, ef_search=64)
    expected = [alone.search(q[i : i + 1], ks[i % 3])[1] for i in range(len(q))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: shard.search(q[i : i + 1], ks[i % 3])[1], range(len(q))))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)


@pytest.mark.parametrize("backend", ["faiss-sq8", "faiss"])
def test_searches_with_parameters_survive_faiss_torch_utils(
    backend: str, data: tuple[np.ndarray, np.ndarray, Path, Path]
) -> None:
    """pytorch-metric-learning's samplers import faiss.contrib.torch_utils, which swaps every Index.search for one
    that takes no `params` (a process that trains and then searches, as a test run does). The shards still
    answer as before, through faiss's own search."""
    pytest.importorskip("torch", reason="faiss.contrib.torch_utils needs torch (the dev install has it)")
    x, q, sq8_path, flat_path = data
    shard = load_shard(backend, sq8_path if backend == "faiss-sq8" else flat_path, dim=64, ef_search=64)
    allowed = np.zeros(len(x), bool)
    allowed[::7] = True
    before = shard.search(q[:20], K), shard.search_subset(q[:20], K, allowed, ef_search=128)
    import faiss.contrib.torch_utils  # noqa: F401 - imported for its side effect, as the samplers do

    after = shard.search(q[:20], K), shard.search_subset(q[:20], K, allowed, ef_search=128)
    for (s0, i0), (s1, i1) in zip(before, after, strict=True):
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_allclose(s0, s1)
