"""`vps build-index --engine ray`: a build's expensive stages on a Ray cluster (the `ray` extra; never imported by
the service).

- Embedding: Ray Data `map_batches` over an actor pool. Each actor holds one ONNX Runtime session with its
  threads set explicitly, and reads, decodes and embeds its batches with the same code as the local engine
  (`load_image`), so a bad image is reported the same way.
- Shards: one Ray task per category; each returns the shard's bytes and the driver writes them into the staging
  version, so workers need not share the index volume.
- The model travels through the object store (its card checked against the driver's on every actor). Images are
  read where the actor runs: `images_root` must be mounted at the same path on every node (a shared volume);
  database blobs travel with their job.

Fault tolerance is Ray's: a dead actor is restarted and its batch retried, `max_retries` times; past that the
build fails with one message and nothing is published (the driver writes the version only after every stage
returned)."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.engine.embedding import Embedder, OnnxEmbedder
from app.errors import ArtifactError, EngineFailed
from app.offline.build.engines import (
    Embedded,
    ImageJob,
    Outcome,
    ShardJob,
    StageOptions,
    build_shard_bytes,
    embed_loaded,
)
from app.offline.progress import Progress, progress

# An address where nothing listens: Ray 2.60's driver retries for about 14 minutes by default (20 tries of about
# 41 s, measured); with these it gives up after one try of about 30 s (31 s measured), exit 7. Values already in
# the environment win. Ray's core reads the two timeouts when it loads, so they are set before `import ray`
# (harmless to a cluster of our own: they bound waits for a GCS that answers at once); the number of tries is
# read by ray.init itself, so it is set only while joining a given address (_cluster): a cluster we start keeps
# Ray's own wait for its GCS to come up.
CONNECT_TIMEOUTS = {"RAY_py_gcs_connect_timeout_s": "20", "RAY_gcs_rpc_server_connect_timeout_s": "5"}
CONNECT_TRIES = ("RAY_gcs_server_port_wait_time_s", "1")


def _bound_connect_timeouts() -> None:
    for name, value in CONNECT_TIMEOUTS.items():
        os.environ.setdefault(name, value)


_bound_connect_timeouts()

import ray  # noqa: E402
import ray.data  # noqa: E402
from ray.data.exceptions import ExecutionTimeoutError, SystemException  # noqa: E402
from ray.exceptions import RayActorError, RayError, WorkerCrashedError  # noqa: E402
from ray.util.annotations import RayDeprecationWarning  # noqa: E402

log = logging.getLogger(__name__)
MODEL_FILES = ("model.json",)  # plus the card's model file


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local cluster for this build (and stop it after)
    workers: int = 2  # embedding actors (each with `threads` CPUs)
    threads: int = 1  # per actor: decode threads and ONNX Runtime intra-op threads
    max_retries: int = 3  # restarts of a dead actor, and retries of its batch
    object_store_bytes: int | None = None  # a local cluster's object store (None: Ray's default)


@dataclass
class RayEngine:
    """A `BuildEngine` on Ray. `model_dir` is the driver's model, shipped to every actor."""

    model_dir: Path
    ray_options: RayOptions = field(default_factory=RayOptions)
    name: str = "ray"

    def embed_images(
        self, jobs: Sequence[ImageJob], images_root: Path | None, embedder: Embedder, options: StageOptions
    ) -> list[Outcome]:
        if not jobs:
            return []
        with _cluster(self.ray_options):
            model = _model_ref(self.model_dir, embedder)
            return _embed_on_ray(jobs, images_root, model, embedder.dim, options, self.ray_options)

    def build_shards(self, jobs: Sequence[ShardJob], options: StageOptions) -> None:
        if not jobs:
            return
        with _cluster(self.ray_options):
            _shards_on_ray(jobs, options, self.ray_options)

    def connected(self) -> AbstractContextManager[None]:
        """One connection (or local cluster) for every stage inside the block."""
        return _cluster(self.ray_options)


@contextmanager
def _cluster(options: RayOptions) -> Iterator[None]:
    """Connect to the cluster (or start a local one) unless this process already is; disconnect only what this
    call connected, and put back the environment and loggers it changed."""
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {
        # "local" starts a cluster for this build even when one runs on the host (None would join it, and then
        # refuse num_cpus).
        "address": options.address or "local",
        "include_dashboard": False,
        "log_to_driver": False,  # workers' output stays in Ray's session logs
        "configure_logging": False,  # Ray's loggers go through ours (_captured_ray_logs)
    }
    if options.address is None:
        kwargs |= {"num_cpus": options.workers * options.threads, "_node_ip_address": "127.0.0.1"}
        if options.object_store_bytes:
            kwargs["object_store_memory"] = options.object_store_bytes
    with _quiet_ray_core(), _captured_ray_logs():
        try:
            with _env_default(*CONNECT_TRIES) if options.address else nullcontext():
                ray.init(**kwargs)
        except (ConnectionError, RayError, RuntimeError, ValueError) as exc:  # RuntimeError: a version mismatch
            ray.shutdown()  # whatever it started before failing
            where = options.address or "(local)"
            raise EngineFailed(f"Ray cluster {where} cannot be reached: {_first_line(exc)}") from exc
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our own bar (or log lines) counts the images
        ctx.print_on_execution_start = False
        try:
            yield
        finally:
            ray.shutdown()


@contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """`name=value` in the environment for the block, unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextmanager
def _quiet_ray_core() -> Iterator[None]:
    """Ray Data's actors always hold constructor arguments in the object store, and Ray's C++ core says so on
    stderr at error level for every actor: raw lines outside our JSON logs. Errors that matter come back as
    Python exceptions (reported as EngineFailed) and stay in the session's log files. Read when Ray starts its
    processes, so set for the cluster's lifetime (a cluster we only join keeps its own level)."""
    before = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)


@contextmanager
def _captured_ray_logs() -> Iterator[None]:
    """Ray's Python loggers print through their own handlers; send warnings and errors through ours (one JSON
    line each) and drop Ray's progress chatter ("progress bars disabled": ours counts)."""
    levels = {"ray": logging.WARNING, "ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}
    saved = []
    for name, level in levels.items():
        logger = logging.getLogger(name)
        saved.append((logger, list(logger.handlers), logger.propagate, logger.level))
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, handlers, propagate, level in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level)


def _model_ref(model_dir: Path, embedder: Embedder) -> Any:
    """The model's files in the object store; the driver's card must be the one loaded here."""
    card = embedder.card
    files = {name: (model_dir / name).read_bytes() for name in (*MODEL_FILES, card.file)}
    return ray.put({"files": files, "sha256": card.sha256})


class _EmbedActor:
    """One ONNX Runtime session per actor, from the model shipped by the driver (hash checked by OnnxEmbedder)."""

    def __init__(self, model: Any, threads: int, images_root: str | None) -> None:
        model = ray.get(model)  # an ObjectRef nested in the constructor's arguments is not resolved by Ray
        # The session reads the files while it is made; the copy goes with the block (a killed actor runs no
        # finaliser, so nothing may be left for later).
        with tempfile.TemporaryDirectory(prefix="vps-model-") as scratch:
            for name, data in model["files"].items():
                (Path(scratch) / name).write_bytes(data)
            self._embedder = OnnxEmbedder(Path(scratch), intra_op_threads=threads)
        if self._embedder.card.sha256 != model["sha256"]:
            raise ArtifactError("the model shipped to a Ray actor is not the driver's")
        self._pool = ThreadPoolExecutor(max_workers=threads)
        self._root = Path(images_root) if images_root else None  # absolute: resolved on the driver

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [
            ImageJob(str(image), bytes(data) if has else None)
            for image, data, has in zip(batch["image"], batch["data"], batch["has_data"], strict=True)
        ]
        outcomes = embed_loaded(jobs, self._root, self._embedder, self._pool)
        dim = self._embedder.dim
        vectors = np.zeros((len(jobs), dim), np.float32)
        for i, o in enumerate(outcomes):
            if isinstance(o, Embedded):
                vectors[i] = o.vector
        return {
            "i": batch["i"],
            "vector": vectors,
            "sha256": np.asarray([o.sha256 if isinstance(o, Embedded) else "" for o in outcomes], dtype=object),
            "problem": np.asarray(["" if isinstance(o, Embedded) else o for o in outcomes], dtype=object),
        }


def _embed_on_ray(
    jobs: Sequence[ImageJob],
    images_root: Path | None,
    model: Any,
    dim: int,
    options: StageOptions,
    ray_options: RayOptions,
) -> list[Outcome]:
    items = [
        {"i": i, "image": j.image, "data": j.data or b"", "has_data": j.data is not None} for i, j in enumerate(jobs)
    ]
    # Up to 8 blocks an actor, so a restarted actor redoes one block, not an eighth of the build; no more actors
    # than blocks (an idle one only costs start-up).
    blocks = max(1, min(-(-len(items) // options.batch_size), ray_options.workers * 8))
    actors = min(ray_options.workers, blocks)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates map_batches' **ray_remote_args, yet its named parameters (and ActorPoolStrategy's)
        # have no max_restarts / max_task_retries; left to Ray Data's default (-1, unbounded), an image that
        # crashes its worker would be retried for ever.
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            _EmbedActor,
            fn_constructor_kwargs={
                "model": model,
                "threads": ray_options.threads,
                "images_root": str(images_root.resolve()) if images_root is not None else None,
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=ray_options.threads,
            max_restarts=ray_options.max_retries,
            max_task_retries=ray_options.max_retries,
        )
    out: list[Outcome | None] = [None] * len(jobs)
    bar: Progress[None] = progress(None, total=len(jobs), desc="embedding (ray)", unit="img", enabled=options.progress)
    try:
        with bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i, vector, digest, problem in zip(
                    batch["i"], batch["vector"], batch["sha256"], batch["problem"], strict=True
                ):
                    out[int(i)] = str(problem) if problem else Embedded(np.asarray(vector, np.float32), str(digest))
                bar.update(len(batch["i"]))
    except (RayError, ExecutionTimeoutError, SystemException) as exc:  # Ray Data's own failures beside Ray's
        raise EngineFailed(f"Ray embedding failed{_retried(exc, ray_options)}: {_first_line(exc)}") from exc
    missing = [i for i, o in enumerate(out) if o is None]
    if missing:  # never a silent gap: every job comes back or the build fails
        raise EngineFailed(f"Ray embedding returned no outcome for {len(missing)} of {len(jobs)} images")
    return [o for o in out if o is not None]


@ray.remote
def _shard_task(vectors: np.ndarray, options: StageOptions, threads: int) -> bytes:
    import faiss

    faiss.omp_set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="vps-shard-") as scratch:
        return build_shard_bytes(vectors, options, Path(scratch))


def _shards_on_ray(jobs: Sequence[ShardJob], options: StageOptions, ray_options: RayOptions) -> None:
    task = _shard_task.options(num_cpus=ray_options.threads, max_retries=ray_options.max_retries)
    refs = [task.remote(job.vectors, options, ray_options.threads) for job in jobs]
    paths = {ref: job.path for ref, job in zip(refs, jobs, strict=True)}
    pending = list(refs)
    bar: Progress[None] = progress(None, total=len(jobs), desc="shards (ray)", unit="shard", enabled=options.progress)
    try:
        with bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                paths[done[0]].write_bytes(ray.get(done[0]))
                bar.update(1)
    except RayError as exc:
        raise EngineFailed(f"Ray shard build failed{_retried(exc, ray_options)}: {_first_line(exc)}") from exc
    finally:
        for ref in pending:  # a build that stops early frees the cluster for whoever runs next
            with suppress(Exception):  # best effort: the connection may be what failed
                ray.cancel(ref, force=True)


def _retried(exc: BaseException, options: RayOptions) -> str:
    """The words ' after N retries' where Ray retried (a dead worker or actor); other errors are not retried."""
    died = isinstance(exc, RayActorError | WorkerCrashedError) or any(
        isinstance(e, RayActorError | WorkerCrashedError) for e in _causes(exc)
    )
    return f" after {options.max_retries} retries" if died else ""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
