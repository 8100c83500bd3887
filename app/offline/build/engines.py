"""Where a build's expensive stages run: embedding the catalogue's images and building the shards.

`LocalEngine` runs them in this process (threads). `app/offline/build/ray_engine.py` runs them on a Ray cluster.
Both take the same jobs and give the same outcomes, in the same order, so the driver (build_index, compaction)
writes and publishes a version the same way whichever engine did the work."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from app.artifacts.manifest import DEFAULT_RESCORE_FACTOR, Backend
from app.artifacts.shards import build_shard
from app.engine.embedding import Embedder, decode_side
from app.errors import ServiceError
from app.offline.datasets.images import PhotoProblem, decode_photo, read_photo
from app.offline.progress import Progress, progress

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ImageJob:
    """One image to embed: its bytes when the driver has them (a database blob), else its path under the
    images root (read where the work runs)."""

    image: str
    data: bytes | None = None


@dataclass(frozen=True)
class Embedded:
    vector: np.ndarray  # (dim,) float32, L2-normalised
    sha256: str  # of the image's bytes


# An image that gave no vector: the reason, as the catalogue report spells it (PhotoProblem reasons, error codes).
Outcome = Embedded | str


@dataclass(frozen=True)
class ShardJob:
    vectors: np.ndarray
    path: Path


@dataclass(frozen=True)
class StageOptions:
    """What the stages need of a build's options (BuildOptions.stages())."""

    batch_size: int = 32
    threads: int = 2
    backend: Backend = "faiss"
    M: int = 32
    ef_construction: int = 200
    rescore_factor: int = DEFAULT_RESCORE_FACTOR
    progress: bool = True


class BuildEngine(Protocol):
    """Port: the two stages a build may run elsewhere. Outcomes come back one per job, in job order."""

    name: str

    def embed_images(
        self, jobs: Sequence[ImageJob], images_root: Path | None, embedder: Embedder, options: StageOptions
    ) -> list[Outcome]: ...

    def build_shards(self, jobs: Sequence[ShardJob], options: StageOptions) -> None: ...


def load_image(job: ImageJob, root: Path | None, embedder: Embedder) -> tuple[np.ndarray, str] | str:
    """Read (unless the job carries its bytes), decode and preprocess one image: the array and the bytes' sha256,
    or the reason it failed. Shared by every engine, so both report a bad image the same way."""
    try:
        if job.data is not None:
            data = job.data
        elif root is None:
            return "no_images_root"
        else:
            data = read_photo(root, job.image)
        array = embedder.preprocess(decode_photo(data, decode_side(embedder.card.input)))
    except PhotoProblem as exc:
        return exc.reason
    except ServiceError as exc:
        return exc.code
    return array, hashlib.sha256(data).hexdigest()


def embed_loaded(
    jobs: Sequence[ImageJob], root: Path | None, embedder: Embedder, pool: ThreadPoolExecutor
) -> list[Outcome]:
    """One batch: load every job on the pool, then one inference call for those that loaded."""
    loaded = list(pool.map(lambda j: load_image(j, root, embedder), jobs))
    good = [x for x in loaded if not isinstance(x, str)]
    vectors = embedder.embed(np.stack([a for a, _ in good])) if good else np.empty((0, embedder.dim), np.float32)
    out: list[Outcome] = []
    it = iter(zip(vectors, (d for _, d in good), strict=True))
    for x in loaded:
        if isinstance(x, str):
            out.append(x)
        else:
            vector, digest = next(it)
            out.append(Embedded(np.asarray(vector, dtype=np.float32), digest))
    return out


def chunks(items: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class LocalEngine:
    """This process: decoding on `options.threads` threads, inference in batches of `options.batch_size`, shards
    one after another (faiss parallelises each build itself)."""

    name = "local"

    def embed_images(
        self, jobs: Sequence[ImageJob], images_root: Path | None, embedder: Embedder, options: StageOptions
    ) -> list[Outcome]:
        root = images_root.resolve() if images_root is not None else None
        out: list[Outcome] = []
        bar: Progress[None] = progress(None, total=len(jobs), desc="embedding", unit="img", enabled=options.progress)
        with ThreadPoolExecutor(max_workers=options.threads) as pool, bar:
            for batch in chunks(jobs, options.batch_size):
                out.extend(embed_loaded(batch, root, embedder, pool))
                bar.update(len(batch))
        return out

    def build_shards(self, jobs: Sequence[ShardJob], options: StageOptions) -> None:
        for job in progress(jobs, desc="shards", unit="shard", enabled=options.progress):
            build_shard(
                options.backend,
                job.vectors,
                job.path,
                M=options.M,
                ef_construction=options.ef_construction,
                rescore_factor=options.rescore_factor,
            )


@dataclass(frozen=True)
class EngineRunner:
    """An engine and the session a command runs it in (a Ray connection held across the command's stages)."""

    engine: BuildEngine
    connected: Callable[[], AbstractContextManager[None]] = nullcontext


def build_shard_bytes(vectors: np.ndarray, options: StageOptions, scratch: Path) -> bytes:
    """A shard built into a scratch file and returned as bytes (for an engine whose workers do not share the
    driver's disk)."""
    path = scratch / "shard"  # the scratch directory is the build's own
    build_shard(
        options.backend,
        vectors,
        path,
        M=options.M,
        ef_construction=options.ef_construction,
        rescore_factor=options.rescore_factor,
    )
    try:
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)
