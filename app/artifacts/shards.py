"""Shard backends behind one port. faiss is the serving default because it memory-maps; hnswlib is in-RAM and
mutable, kept for small live segments and for benchmarks. faiss-sq8 is the compressed one: the graph walks 8-bit
scalar-quantised codes (a quarter of the float bytes, the part a search touches all over) and the best
`rescore_factor * k` candidates are re-scored exactly from float vectors kept in the same memory-mapped file
(faiss IndexRefineFlat), of which a search reads only those few rows (docs/scaling.md, "Compress")."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import faiss
import hnswlib
import numpy as np

from app.artifacts.manifest import DEFAULT_RESCORE_FACTOR, Backend
from app.errors import ArtifactError

SHARD_SUFFIX: dict[str, str] = {"faiss": ".faiss", "hnswlib": ".hnsw", "faiss-sq8": ".sq8.faiss"}


class ShardIndex(Protocol):
    """Port: one category's vectors. `search` returns (scores, local ids) of shape (nq, k'); -1 pads."""

    @property
    def dim(self) -> int: ...

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def vectors(self) -> np.ndarray:
        """All stored vectors in id order (for evaluation against exact search)."""
        ...

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of local ids `ids` (a filter's exact scan over its few matching rows)."""
        ...

    def search_subset(
        self, queries: np.ndarray, k: int, allowed: np.ndarray, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """`search` returning only local ids where `allowed` (bool, one per id) is true; the graph walk is as
        wide as `ef_search`."""
        ...


def _read_faiss(path: Path, mmap: bool) -> Any:
    # MMAP_IFC + READ_ONLY: the graph and vectors stay file-backed pages, shared by every worker process.
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        raise ArtifactError(f"shard {path}: faiss cannot read it") from exc


def _float_view(flat: Any, n: int, d: int) -> np.ndarray:
    """A flat index's float vectors as a read-only view of its (memory-mapped) storage: no copy. The caller keeps
    the index's owner alive as long as the view."""
    view: np.ndarray = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)  # type: ignore[attr-defined,unused-ignore]  # faiss stubs differ by release
    view.setflags(write=False)
    return view


def _search_with_params(index: Any, q: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
    """`index.search(q, k, params=params)`. faiss.contrib.torch_utils, which pytorch-metric-learning's samplers
    import (so a process that trains, such as a test run), replaces every Index.search with one that takes no
    `params`; it keeps faiss's own as `search_numpy`."""
    search = getattr(index, "search_numpy", index.search)
    scores, ids = search(q, k, params=params)
    return scores, ids


def _bitmap_selector(allowed: np.ndarray) -> tuple[np.ndarray, Any]:
    """A faiss selector over `allowed` (one bool a local id) and the bits it reads, which the caller keeps alive
    through the search."""
    bits = np.packbits(allowed, bitorder="little")
    return bits, faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))  # its size in bytes


class FaissHnswShard:
    def __init__(self, index: faiss.Index) -> None:
        self._index = index
        self._view: np.ndarray | None = None

    @classmethod
    def load(cls, path: Path, *, ef_search: int, mmap: bool = True) -> FaissHnswShard:
        index = _read_faiss(path, mmap)
        # read_index returns the concrete class. (downcast_index would hand back a second, non-owning wrapper
        # while this one, the owner, is freed: a dangling pointer.)
        if not isinstance(index, faiss.IndexHNSW):
            raise ArtifactError(f"shard {path}: expected an HNSW index, got {type(index).__name__}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ArtifactError(f"shard {path}: metric expected inner product, got {index.metric_type}")
        index.hnsw.efSearch = ef_search
        return cls(index)

    def set_ef_search(self, ef_search: int) -> None:
        self._index.hnsw.efSearch = ef_search  # type: ignore[attr-defined]

    @staticmethod
    def build(vectors: np.ndarray, path: Path, *, M: int, ef_construction: int) -> None:
        index = faiss.IndexHNSWFlat(vectors.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        faiss.write_index(index, str(path))

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self._index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids

    def vectors(self) -> np.ndarray:
        out: np.ndarray = self._index.reconstruct_n(0, self.ntotal)
        return out

    def rows(self, ids: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._stored()[ids]
        return out

    def _stored(self) -> np.ndarray:
        """The flat storage's vectors as a read-only view of the (memory-mapped) index: no copy. The view lives
        no longer than this object, which owns the index."""
        if self._view is None:
            storage = faiss.downcast_index(self._index.storage)  # type: ignore[attr-defined]
            self._view = _float_view(storage, self.ntotal, self.dim)
        return self._view

    def search_subset(
        self, queries: np.ndarray, k: int, allowed: np.ndarray, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        bits, selector = _bitmap_selector(allowed)
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef_search, k))  # type: ignore[attr-defined]
        scores, ids = _search_with_params(self._index, np.ascontiguousarray(queries, dtype=np.float32), k, params)
        del bits  # faiss reads it, never owns it: alive until here
        return scores, ids


class FaissHnswSq8Shard:
    """HNSW over SQ8 codes, re-scored from the float vectors: faiss IndexRefineFlat(IndexHNSWSQ), one file.

    `rescore_factor` f: the graph hands f * k candidates to an exact re-scoring from the float rows; f = 0 ranks
    and scores by the codes alone and reads no float row (a node whose memory holds only the graph and codes)."""

    def __init__(self, index: faiss.IndexRefineFlat, ef_search: int) -> None:
        self._index = index  # the owner of the base and refine indexes (own_fields)
        self._base = faiss.downcast_index(index.base_index)  # non-owning views, living no longer than _index
        self._refine = faiss.downcast_index(index.refine_index)
        self._view: np.ndarray | None = None
        self._factor = int(index.k_factor)  # as built
        self._ef_search = ef_search
        self._params: dict[int, Any] = {}  # search parameters by k, remade when a setting changes

    @classmethod
    def load(cls, path: Path, *, ef_search: int, mmap: bool = True) -> FaissHnswSq8Shard:
        index = _read_faiss(path, mmap)
        if not isinstance(index, faiss.IndexRefineFlat):
            raise ArtifactError(f"shard {path}: expected a re-scored SQ8 index, got {type(index).__name__}")
        base, refine = faiss.downcast_index(index.base_index), faiss.downcast_index(index.refine_index)
        if not isinstance(base, faiss.IndexHNSWSQ):
            raise ArtifactError(f"shard {path}: expected HNSW over SQ8 codes, got {type(base).__name__}")
        if {index.metric_type, base.metric_type, refine.metric_type} != {faiss.METRIC_INNER_PRODUCT}:
            raise ArtifactError(f"shard {path}: metric expected inner product")
        if not index.ntotal == base.ntotal == refine.ntotal:
            raise ArtifactError(f"shard {path}: codes and float vectors differ in count")
        return cls(index, ef_search)

    def set_ef_search(self, ef_search: int) -> None:
        self._ef_search = ef_search
        self._params = {}

    @property
    def rescore_factor(self) -> int:
        return self._factor

    def set_rescore_factor(self, factor: int) -> None:
        if factor < 0:
            raise ValueError(f"rescore factor must be >= 0, got {factor}")
        self._factor = factor
        self._params = {}

    def _search_params(self, k: int, ef_search: int, selector: Any = None) -> Any:
        # The walk is at least as wide as the candidates it hands to the re-scoring (faiss would stop at efSearch).
        base = faiss.SearchParametersHNSW(efSearch=max(ef_search, k * max(self._factor, 1)), sel=selector)  # type: ignore[attr-defined]
        if self._factor == 0:
            return base
        return faiss.IndexRefineSearchParameters(  # type: ignore[call-arg]
            k_factor=float(self._factor), base_index_params=base, sel=selector
        )

    def _searched(self, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        index = self._base if self._factor == 0 else self._index
        return _search_with_params(index, q, k, params)

    @staticmethod
    def build(
        vectors: np.ndarray, path: Path, *, M: int, ef_construction: int, rescore_factor: int = DEFAULT_RESCORE_FACTOR
    ) -> None:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        base = faiss.IndexHNSWSQ(x.shape[1], faiss.ScalarQuantizer.QT_8bit, M, faiss.METRIC_INNER_PRODUCT)  # type: ignore[arg-type]
        base.hnsw.efConstruction = ef_construction
        index = faiss.IndexRefineFlat(base)  # its Python wrapper keeps `base` referenced
        index.k_factor = float(rescore_factor)
        index.train(x)  # the quantiser's per-dimension range
        index.add(x)
        faiss.write_index(index, str(path))

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        params = self._params.get(k)
        if params is None:
            params = self._search_params(k, self._ef_search)
            self._params = {**self._params, k: params}  # a new dict: a concurrent search keeps reading the old
        return self._searched(queries, k, params)

    def vectors(self) -> np.ndarray:
        return np.array(self._stored())

    def rows(self, ids: np.ndarray) -> np.ndarray:
        out: np.ndarray = self._stored()[ids]
        return out

    def _stored(self) -> np.ndarray:
        """The float vectors as a read-only view of the (memory-mapped) refine index, owned by this object."""
        if self._view is None:
            self._view = _float_view(self._refine, self.ntotal, self.dim)
        return self._view

    def search_subset(
        self, queries: np.ndarray, k: int, allowed: np.ndarray, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        bits, selector = _bitmap_selector(allowed)
        scores, ids = self._searched(queries, k, self._search_params(k, ef_search, selector))
        del bits  # faiss reads it, never owns it: alive until here
        return scores, ids


class HnswlibShard:
    def __init__(self, index: hnswlib.Index, dim: int) -> None:
        self._index = index
        self._dim = dim

    @classmethod
    def load(cls, path: Path, *, dim: int, ef_search: int) -> HnswlibShard:
        index = hnswlib.Index(space="ip", dim=dim)
        try:
            index.load_index(str(path))
        except RuntimeError as exc:
            raise ArtifactError(f"shard {path}: hnswlib cannot read it") from exc
        index.set_ef(ef_search)
        index.set_num_threads(1)
        return cls(index, dim)

    def set_ef_search(self, ef_search: int) -> None:
        self._index.set_ef(ef_search)

    @staticmethod
    def build(vectors: np.ndarray, path: Path, *, M: int, ef_construction: int) -> None:
        index = hnswlib.Index(space="ip", dim=vectors.shape[1])
        index.init_index(max_elements=len(vectors), ef_construction=ef_construction, M=M, random_seed=0)
        index.add_items(np.ascontiguousarray(vectors, dtype=np.float32), np.arange(len(vectors)))
        index.save_index(str(path))

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return int(self._index.get_current_count())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, self.ntotal)
        labels, distances = self._index.knn_query(np.ascontiguousarray(queries, dtype=np.float32), k=kk)
        # hnswlib's "ip" distance is 1 - inner product.
        scores = (1.0 - distances).astype(np.float32)
        ids = labels.astype(np.int64)
        if kk < k:
            pad = k - kk
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores, ids

    def vectors(self) -> np.ndarray:
        return np.asarray(self._index.get_items(list(range(self.ntotal))), dtype=np.float32)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(self._index.get_items([int(i) for i in ids]), dtype=np.float32)

    def search_subset(
        self, queries: np.ndarray, k: int, allowed: np.ndarray, ef_search: int
    ) -> tuple[np.ndarray, np.ndarray]:
        kk = min(k, int(np.count_nonzero(allowed)))
        if kk == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        # hnswlib calls a Python predicate per visited node: slow, but the faiss backend is the default. Its ef
        # is one setting of the whole index, shared by concurrent searches: the load's stays (ef_search unused).
        labels, distances = self._index.knn_query(
            np.ascontiguousarray(queries, dtype=np.float32), k=kk, filter=lambda i: bool(allowed[i])
        )
        scores = (1.0 - distances).astype(np.float32)
        ids = labels.astype(np.int64)
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, k - kk)), constant_values=-1)
        return scores, ids


def build_shard(
    backend: Backend,
    vectors: np.ndarray,
    path: Path,
    *,
    M: int,
    ef_construction: int,
    rescore_factor: int = DEFAULT_RESCORE_FACTOR,
) -> None:
    if backend == "faiss":
        FaissHnswShard.build(vectors, path, M=M, ef_construction=ef_construction)
    elif backend == "faiss-sq8":
        FaissHnswSq8Shard.build(vectors, path, M=M, ef_construction=ef_construction, rescore_factor=rescore_factor)
    else:
        HnswlibShard.build(vectors, path, M=M, ef_construction=ef_construction)


def load_shard(backend: Backend, path: Path, *, dim: int, ef_search: int) -> ShardIndex:
    shard: ShardIndex
    if backend == "faiss":
        shard = FaissHnswShard.load(path, ef_search=ef_search)
    elif backend == "faiss-sq8":
        shard = FaissHnswSq8Shard.load(path, ef_search=ef_search)
    else:
        shard = HnswlibShard.load(path, dim=dim, ef_search=ef_search)
    if shard.dim != dim:
        raise ArtifactError(f"shard {path}: dim expected {dim} (manifest), got {shard.dim}")
    return shard
