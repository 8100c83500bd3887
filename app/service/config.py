"""Service settings: one typed object, read from `VPS_*` environment variables and validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.engine.imaging import MAX_DECODE_BYTES, MAX_IMAGE_PIXELS
from app.engine.search import FILL_MAX_PROBES, OVERFETCH

# The model the repository ships, found from the package rather than the working directory: a checkout or an
# editable install keeps models/ beside app/. An installed wheel carries no models (the image copies one and sets
# VPS_MODEL_DIR): there this path does not exist and `vps` says so.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "grocery-lite1-ms512-sp208-int8"


def catalogue_database_url(url: str | None, index_dir: Path) -> str:
    """The catalogue database the service and the CLI use: `url`, else the SQLite file beside the index."""
    if url is None:
        return f"sqlite:///{(index_dir / 'catalogue.db').absolute()}"
    # A bare postgresql:// would pick psycopg2, which is not installed: psycopg 3 is.
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VPS_", extra="forbid", frozen=True)

    index_dir: Path = Field(Path("index_data"), description="Directory holding CURRENT and index versions")
    model_dir: Path = Field(SHIPPED_MODEL_DIR, description="Directory with model.onnx and model.json")

    # Untrusted input limits.
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="Byte cap of one image")
    max_image_pixels: int = Field(MAX_IMAGE_PIXELS, ge=64, description="Pixel cap, read from the header")
    # Memory one decode may take, estimated from the header before any pixel is decoded (app/engine/imaging.py),
    # and the decode memory of all requests in flight together (beyond it: 503 `overloaded`, retryable).
    max_decode_bytes: int = Field(MAX_DECODE_BYTES, ge=1024 * 1024, description="Decode memory cap of one image")
    decode_budget_bytes: int = Field(
        2 * MAX_DECODE_BYTES, ge=1024 * 1024, description="Decode memory of all requests in flight, at most"
    )

    # Concurrency: a bounded pool runs decode, inference and search; admission control in front of it.
    # 3 on 2 cores: a third thread keeps both cores busy while another holds the GIL (decode, grouping) or the
    # event loop does (HTTP): the best HTTP throughput and HTTP / in-process ratio (docs/benchmarks.md).
    pool_threads: int = Field(3, ge=1, le=64, description="Worker threads for decode/embed/search")
    # None: pool_threads, nothing queued behind the pool. Measured (scripts/loadtest.py, 2 cores, open loop at 2x
    # capacity), accepted p99 against the unloaded p99: pool 2 with 8 admitted 5.5x, 4 3.8x, 3 2.8x; pool 3 with
    # 4 admitted 3.5x, 3 1.8x. Queueing beyond that only adds latency; the excess is better refused at once.
    max_inflight: int | None = Field(None, ge=1, le=4096, description="Requests admitted at once; more get 503")
    retry_after_s: int = Field(1, ge=1, le=3600)
    # Requests in progress per worker (uploads included); beyond it 503 `overloaded` at once (app/service/server.py).
    # /healthz, /readyz and /metrics never count and are never refused.
    max_connections: int = Field(256, ge=8, le=65536, description="Requests in progress per worker")
    # HTTP heads (app/service/server.py): request line + headers in bytes and fields (431 beyond), and the time
    # from a connection's opening, or a later request's first byte, to its complete head (408, then closed).
    max_header_bytes: int = Field(32 * 1024, ge=1024, le=1024 * 1024, description="Bytes of one request head")
    max_headers: int = Field(100, ge=8, le=10000, description="Header fields of one request")
    head_timeout_s: float = Field(10.0, gt=0.0, le=300.0, description="Seconds to receive a complete request head")
    # A request finding every compute slot taken waits up to queue_wait_s, at most max_queued of them at once,
    # unless a request was refused in the last second (app/service/runner.py); else 503 `overloaded`. Measured
    # (2 cores, demo index): a burst of 300 got 3 + max_queued answers (12: 15, 0: 3); sustained 2x overload
    # kept accepted p99 at 2.3x the unloaded p99, as with no queue (scripts/loadtest.py, docs/hardening.md).
    queue_wait_s: float = Field(0.25, ge=0.0, le=60.0, description="Longest wait for a compute slot")
    max_queued: int = Field(12, ge=0, le=4096, description="Requests waiting for a compute slot at most")
    # A request whose decode + inference + search takes longer answers 503 `deadline_exceeded`; its admission
    # slot stays taken until the work really ends (a thread cannot be interrupted), so slow work still counts.
    request_timeout_s: float = Field(10.0, gt=0.0, le=600.0, description="Deadline of one search's work")
    ort_intra_op_threads: int = Field(1, ge=1, le=64, description="ONNX Runtime intra-op threads")
    ort_inter_op_threads: int = Field(1, ge=1, le=64)
    # Micro-batching (app/engine/batching.py): a search's inference waits up to this long for the images other
    # requests are decoding, and runs with them in one call. 0: off (measured in docs/benchmarks.md).
    micro_batch_window_ms: float = Field(0.0, ge=0.0, le=50.0, description="Micro-batching window (0: off)")
    micro_batch_max_images: int = Field(8, ge=2, le=64, description="Images in one micro-batched inference call")

    # Search defaults (a request may override within the API's bounds).
    default_k: int = Field(10, ge=1, le=100)
    # None: use the value the index build chose and recorded in its manifest.
    probe_mass: float | None = Field(None, gt=0.0, le=1.0, description="Router probability mass to probe")
    max_probes: int | None = Field(None, ge=1, le=1000, description="Most shards searched per query")
    # When the chosen shards hold fewer than k SKUs (or fewer pass min_score), the next shards in probability
    # order are searched until k SKUs are found, at most this many more (0: never fill).
    fill_max_probes: int = Field(FILL_MAX_PROBES, ge=0, le=4096, description="Most shards added to fill k SKUs")
    ef_search: int | None = Field(None, ge=8, le=4096, description="HNSW efSearch at query time")
    overfetch: int = Field(OVERFETCH, ge=1, le=50, description="Images fetched per wanted SKU before grouping")
    warmup_queries: int = Field(3, ge=0, le=100)
    # Each index file's sha256 is remembered with the file's identity (device, inode, size, mtime, ctime), so a
    # restart does not re-read unchanged files to hash them (app/artifacts/verified.py). Unwritable: hashes every time.
    # Off by default: an operator should see a broken version, not silently serve an older catalogue.
    fallback_to_previous: bool = Field(
        False, description="When CURRENT's version is refused, serve the newest earlier version that verifies"
    )
    verify_shards: Literal["before_ready", "background"] = Field(
        "background",
        description="First start: hash and load shards before ready, or after it (each before its first search; "
        "a swap always verifies first; before_ready whenever fallback_to_previous is set)",
    )
    remember_verification: bool = Field(True, description="Skip re-hashing index files unchanged since verified")
    verify_cache_dir: Path | None = Field(None, description="Verification records; default <index_dir>/.verified")

    # Off by default: the build calibrates thresholds against simulated unknowns at 50 % prevalence, strict for
    # a shop where most queries are catalogue products (demo: 3 of 12 sample photos answered, 9 of 12 right).
    open_set: bool = Field(False, description="Answer match=false below the manifest's per-category thresholds")

    # Shadow recall: this share of routed searches is searched again with every shard probed, by one background
    # thread of its own (never a compute slot), to count the products routing loses (app/service/shadow.py). A full
    # queue drops the sample (counted): no request waits for shadow work or fails by it.
    shadow_sample: float = Field(0.02, ge=0.0, le=1.0, description="Share of searches re-run on every shard (0: off)")
    shadow_queue: int = Field(8, ge=1, le=1024, description="Shadow searches waiting at most; more are dropped")
    # Query capture for `vps mine` (app/service/capture.py, docs/capture.md): opt-in, off the request path.
    capture_sample: float = Field(0.0, ge=0.0, le=1.0, description="Share of searches whose photo is kept (0: off)")
    capture_dir: Path | None = Field(None, description="Where captured photos go (required when capture is on)")
    capture_max_bytes: int = Field(1 << 30, ge=1 << 20, description="Captured bytes kept at most; oldest go first")
    capture_max_age_s: float = Field(7 * 86400, gt=0, description="Captures older than this are removed")
    capture_queue: int = Field(16, ge=1, le=1024, description="Captures waiting to be written; more are dropped")

    # Index updates: /admin/reload, and optionally a watch of CURRENT (every worker process polls on its own, so
    # the watch is how all workers of a pod pick up a published version).
    index_watch_s: float = Field(0.0, ge=0.0, le=3600.0, description="Poll CURRENT every N s (0: off)")
    # SIGTERM: /readyz 503 at once, keep serving this long, then stop accepting and finish requests in flight.
    drain_s: float = Field(2.0, ge=0.0, le=300.0, description="Seconds to keep serving after SIGTERM")

    # Root of the catalogue's image paths (as given to build-index), for the web page's result images. Only images
    # of rows in the live index are served from it; unset: results carry no image_url.
    catalogue_images_dir: Path | None = Field(None, description="Root of catalogue image paths, for GET /")

    # Unset: any Host is answered (no response is built from it). Set (JSON list, e.g. ["search.example.com",
    # "127.0.0.1"]): other hosts get 400 `invalid_host`; /healthz, /readyz and /metrics answer any (probes send
    # the pod IP).
    allowed_hosts: list[str] | None = Field(None, description="Host header values answered; others get 400")
    admin_token: SecretStr | None = Field(None, description="Bearer token for /admin and /v1/products writes")

    # The catalogue of record (app/catalogue/store.py): unset, a SQLite file `catalogue.db` in index_dir; else a
    # SQLAlchemy URL, `sqlite:///path` or `postgresql+psycopg://user:password@host/db` (several replicas).
    catalogue_url: SecretStr | None = Field(None, description="Catalogue database URL (default: SQLite in index_dir)")
    # Every worker and replica applies catalogue changes within this many seconds (the process that took a write
    # applies it before answering).
    sync_s: float = Field(1.0, gt=0.0, le=2.0, description="Seconds between catalogue change-log polls")
    max_images_per_write: int = Field(16, ge=1, le=64, description="Images one POST /v1/products/{sku}/images takes")
    max_batch_images: int = Field(16, ge=1, le=64, description="Images one POST /v1/search/batch takes")
    # A batch is read whole before admission, as a single search is: its bytes are bounded on their own, below
    # max_batch_images x max_upload_bytes (160 MiB at the defaults), so that slow uploads cannot hold that much.
    max_batch_bytes: int = Field(32 * 1024 * 1024, ge=1024 * 1024, description="Bytes one batch body holds at most")
    # Past this many live delta images a process compacts the catalogue into a new version (one replica at a
    # time; app/service/compactor.py); 0: never (a `vps compact` job does it, as in Kubernetes).
    compact_above: int = Field(10_000, ge=0, description="Delta images that trigger a compaction (0: off)")
    max_delta_skus: int = Field(100_000, ge=1, description="Changed SKUs a process serves live at most")
    log_level: str = Field("INFO", pattern="^(DEBUG|INFO|WARNING|ERROR)$")

    def catalogue_database_url(self) -> str:
        return catalogue_database_url(
            self.catalogue_url.get_secret_value() if self.catalogue_url is not None else None, self.index_dir
        )

    @model_validator(mode="after")
    def _catalogue_url_is_supported(self) -> Settings:
        url = self.catalogue_url.get_secret_value() if self.catalogue_url is not None else None
        if url is not None and not url.startswith(("sqlite:///", "postgresql+psycopg://", "postgresql://")):
            raise ValueError("catalogue_url must be sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
        return self

    @model_validator(mode="after")
    def _capture_has_a_directory(self) -> Settings:
        if self.capture_sample > 0 and self.capture_dir is None:
            raise ValueError("capture_dir (VPS_CAPTURE_DIR) is required when capture_sample is above 0")
        return self

    @model_validator(mode="after")
    def _budget_holds_one_decode(self) -> Settings:
        if self.decode_budget_bytes < self.max_decode_bytes:
            raise ValueError("decode_budget_bytes must be at least max_decode_bytes (one largest decode must fit)")
        return self

    @property
    def admission_limit(self) -> int:
        return self.max_inflight if self.max_inflight is not None else self.pool_threads
