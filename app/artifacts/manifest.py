"""The index manifest: read, verify, write; and the atomic CURRENT pointer."""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.artifacts.hashing import sha256_stream
from app.artifacts.verified import FileIdentity, VerifiedFiles
from app.errors import ArtifactError

FORMAT_VERSION = 1
# Shard index kinds (app/artifacts/shards.py), named here so that reading a manifest needs no index library.
Backend = Literal["faiss", "hnswlib", "faiss-sq8"]
# faiss-sq8: the candidates re-scored exactly, per hit a shard is asked for. Measured at 1M, as the service asks
# (64 hits a shard; docs/bench/bench_compressed.md): 1 gives the float shards' recall@10 at the same efSearch
# (0.969 against 0.969 at 128) and exact scores; 2 only widens the walk as a higher efSearch would; 0 reads no
# float row (0.8-0.9 points lower at 128 and 256, scores within 0.0011).
DEFAULT_RESCORE_FACTOR = 1
CURRENT_FILE = "CURRENT"
HASH_THREADS = max(1, min(4, os.cpu_count() or 1))  # files hashed at once (hashlib releases the GIL)
MANIFEST_FILE = "manifest.json"
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    sha256: str
    dim: int = Field(gt=0)


class CategoryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shard: str = Field(description="Shard file, relative to the version directory")
    n_vectors: int = Field(gt=0)
    n_skus: int = Field(gt=0)
    offset: int = Field(ge=0, description="Item-table row of the shard's vector 0")
    sha256: str


class BuildParams(BaseModel):
    model_config = ConfigDict(extra="allow")
    M: int
    ef_construction: int
    ef_search: int
    images_total: int
    images_failed: int
    n_clusters: int | None = Field(None, description="k chosen by the build when the catalogue had no categories")
    catalogue_views: int = Field(0, description="augmented views stored per image of a SKU with few images")
    views_max_images: int = Field(2, description="a SKU with at most this many images gets catalogue views")
    rescore_factor: int | None = Field(None, description="faiss-sq8: candidates re-scored exactly per result")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: int
    version: str
    created: str
    model: ModelRef
    metric: Literal["cosine"] = "cosine"
    backend: Backend
    dim: int = Field(gt=0)
    n_items: int = Field(ge=0)
    categories: list[CategoryEntry]
    router: str = "router.npz"
    items: str = "items.jsonl"
    item_offsets: str = "items.offsets.npy"
    attributes: str | None = None  # the attribute columns (app/artifacts/attributes.py); None: built before them
    category_source: Literal["catalogue", "kmeans"] = "catalogue"
    probe_mass: float = Field(gt=0.0, le=1.0)
    max_probes: int = Field(ge=1)
    # Open set: a query whose top hit scores below its category's threshold answers "match": false.
    thresholds: dict[str, float] = Field(default_factory=dict)
    global_threshold: float = -1.0
    router_report: dict[str, Any] = Field(default_factory=dict)
    build: BuildParams
    files: dict[str, FileEntry]
    # The catalogue database's sequence number the version holds (compaction); None: built from a CSV alone.
    # Changes after it are applied live (app/engine/delta.py).
    catalogue_seq: int | None = None
    catalogue_id: str | None = None  # which catalogue database (app/catalogue/store.py)

    def threshold(self, category: str) -> float:
        """The open-set score threshold for a top hit of `category` (the global one where none was fitted)."""
        return self.thresholds.get(category, self.global_threshold)

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "catalogue_seq": self.catalogue_seq,
            "created": self.created,
            "backend": self.backend,
            "metric": self.metric,
            "dim": self.dim,
            "n_items": self.n_items,
            "n_categories": len(self.categories),
            "category_source": self.category_source,
            "probe_mass": self.probe_mass,
            "max_probes": self.max_probes,
            "thresholds": self.thresholds,
            "global_threshold": self.global_threshold,
            "router": self.router_report,
            "model": self.model.model_dump(),
            "build": self.build.model_dump(),
        }


def read_manifest(version_dir: Path) -> Manifest:
    path = version_dir / MANIFEST_FILE
    try:
        manifest = Manifest.model_validate(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        raise ArtifactError(f"manifest missing: {path}") from exc
    except ValueError as exc:
        raise ArtifactError(f"manifest invalid: {path}: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(f"manifest {path}: format_version expected {FORMAT_VERSION}, got {manifest.format_version}")
    return manifest


def verify_files(version_dir: Path, manifest: Manifest, remembered: VerifiedFiles | None = None) -> int:
    """Check every file's size, then its sha256, against the manifest; returns how many files were hashed. A
    truncated memory-mapped file would crash the process at query time, so nothing is served before this passes.
    With `remembered`, a file whose identity is the one recorded when it last hashed to the manifest's sha256
    is not read again (app/artifacts/verified.py); the record is updated after a pass."""
    files = IndexFiles(version_dir, manifest, remembered)
    hashed = files.verify(manifest.files)
    files.remember()
    return hashed


class IndexFiles:
    """One version's files against its manifest, in two steps: the constructor checks that every referenced
    file is listed, present, regular and of its listed size (cheap: it catches truncated and half-copied
    files at once); `verify(rels)` hashes those files (unless remembered), from any thread, so a service can
    verify its shards after it starts while no shard is read before its own hash passed."""

    def __init__(self, version_dir: Path, manifest: Manifest, remembered: VerifiedFiles | None = None) -> None:
        referenced = {c.shard for c in manifest.categories} | {manifest.router, manifest.items, manifest.item_offsets}
        referenced |= {manifest.attributes} if manifest.attributes else set()
        missing = referenced - manifest.files.keys()
        if missing:
            raise ArtifactError(f"manifest {version_dir}: files not listed in the manifest: {sorted(missing)}")
        self.manifest, self.remembered = manifest, remembered
        self._paths = {rel: safe_join(version_dir, rel) for rel in manifest.files}
        self._stat_time_ns = time.time_ns()
        self._identities = {rel: _checked_identity(self._paths[rel], e.size) for rel, e in manifest.files.items()}
        self._verified: set[str] = set()
        self._lock = threading.Lock()

    def path(self, rel: str) -> Path:
        return self._paths[rel]

    def verify(self, rels: Iterable[str]) -> int:
        """Hash `rels` (those not remembered nor verified already) and check them; returns how many were hashed.
        Raises ArtifactError naming the file and both hashes."""
        with self._lock:
            todo = [r for r in dict.fromkeys(rels) if r not in self._verified]
        to_hash = [r for r in todo if self._remembered_sha(r) != self.manifest.files[r].sha256]
        # Hashing is most of the load time of a large index; hashlib releases the GIL, so files hash in parallel.
        if len(to_hash) <= 1:  # a shard verified on its own: no pool to start
            hashed = {r: _hash_with_identity(self._paths[r]) for r in to_hash}
        else:
            with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
                digests = pool.map(_hash_with_identity, [self._paths[r] for r in to_hash])
                hashed = dict(zip(to_hash, digests, strict=True))
        for rel, (identity, digest) in hashed.items():
            if identity != self._identities[rel]:  # replaced or rewritten since the size check: not what was checked
                raise ArtifactError(f"index file {self._paths[rel]}: changed while being verified")
            expected = self.manifest.files[rel].sha256
            if digest != expected:
                raise ArtifactError(f"index file {self._paths[rel]}: sha256 expected {expected}, got {digest}")
        for rel in set(todo) - hashed.keys():  # remembered: still the file whose identity was remembered?
            if _checked_identity(self._paths[rel], self.manifest.files[rel].size) != self._identities[rel]:
                raise ArtifactError(f"index file {self._paths[rel]}: changed while being verified")
        with self._lock:
            self._verified.update(todo)
        return len(to_hash)

    def _remembered_sha(self, rel: str) -> str | None:
        return None if self.remembered is None else self.remembered.remembered(rel, self._identities[rel])

    def remember(self) -> None:
        """Record the verified files (all of them, once every file passed) for the next start."""
        if self.remembered is None:
            return
        with self._lock:
            if self._verified != self.manifest.files.keys():
                return
        files = self.manifest.files
        self.remembered.save({rel: (self._identities[rel], e.sha256) for rel, e in files.items()}, self._stat_time_ns)


def _checked_identity(path: Path, size: int) -> FileIdentity:
    try:
        st = path.stat()
    except OSError:
        raise ArtifactError(f"index file {path}: missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"index file {path}: not a regular file")
    if st.st_size != size:
        raise ArtifactError(f"index file {path}: size expected {size}, got {st.st_size}")
    return FileIdentity.of(st)


def _hash_with_identity(path: Path) -> tuple[FileIdentity, str]:
    """The file's identity taken on the open descriptor, so it names the bytes that were hashed."""
    with path.open("rb") as fh:
        identity = FileIdentity.of(os.fstat(fh.fileno()))
        return identity, sha256_stream(fh)


def write_manifest(version_dir: Path, manifest: Manifest) -> None:
    (version_dir / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2) + "\n")


def safe_join(root: Path, rel: str) -> Path:
    """Join a manifest-relative path, refusing anything that escapes the version directory."""
    candidate = (root / rel).resolve()
    if not candidate.is_relative_to(root.resolve()):
        raise ArtifactError(f"manifest path escapes the version directory: {rel!r}")
    return candidate


def resolve_current(index_dir: Path) -> Path:
    pointer = index_dir / CURRENT_FILE
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError as exc:
        raise ArtifactError(f"no index: {pointer} is missing (run `vps build-index`)") from exc
    if not _VERSION_RE.match(name):
        raise ArtifactError(f"{pointer}: not a version name: {name[:80]!r}")
    version_dir = index_dir / name
    if not version_dir.is_dir():
        raise ArtifactError(f"{pointer}: version directory {version_dir} is missing")
    return version_dir


def earlier_versions(index_dir: Path) -> list[Path]:
    """Version directories other than the one CURRENT names, newest first (names start with their UTC time)."""
    try:
        current = (index_dir / CURRENT_FILE).read_text().strip()
    except OSError:
        current = ""
    found = [
        d
        for d in index_dir.iterdir()
        if d.is_dir() and d.name != current and _VERSION_RE.match(d.name) and (d / MANIFEST_FILE).is_file()
    ]
    return sorted(found, key=lambda d: d.name, reverse=True)


def make_read_only(version_dir: Path) -> None:
    """Published files are never written again: a file truncated or rewritten under a running server (its
    shards are memory-mapped) crashes the process with SIGBUS, so the build takes write permission away."""
    for path in version_dir.rglob("*"):
        if path.is_file():
            path.chmod(0o444)


def publish_current(index_dir: Path, version: str) -> None:
    """Point CURRENT at `version` atomically (write a temp file, fsync, rename over)."""
    if not _VERSION_RE.match(version):
        raise ValueError(f"not a version name: {version!r}")
    tmp = index_dir / f".{CURRENT_FILE}.{os.getpid()}.tmp"
    with tmp.open("w") as fh:
        fh.write(version + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, index_dir / CURRENT_FILE)
