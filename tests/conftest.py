from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.offline.build.build_index import BuildOptions, build_index
from app.service.config import SHIPPED_MODEL_DIR, Settings
from tests.helpers import make_catalogue, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_catalogue(tmp_path_factory.mktemp("catalogue"))


def _build(tmp: Path, catalogue: Path, model: Path, backend: str) -> Path:
    out = tmp / f"index_{backend}"
    build_index(
        catalogue,
        catalogue.parent,
        out,
        model,
        BuildOptions(backend=backend, M=8, ef_construction=40, progress=False),  # type: ignore[arg-type]
    )
    return out


@pytest.fixture(scope="session")
def faiss_index(tmp_path_factory: pytest.TempPathFactory, catalogue: Path, tiny_model: Path) -> Path:
    return _build(tmp_path_factory.mktemp("idx"), catalogue, tiny_model, "faiss")


@pytest.fixture(scope="session")
def hnswlib_index(tmp_path_factory: pytest.TempPathFactory, catalogue: Path, tiny_model: Path) -> Path:
    return _build(tmp_path_factory.mktemp("idx"), catalogue, tiny_model, "hnswlib")


@pytest.fixture(scope="session")
def sq8_index(tmp_path_factory: pytest.TempPathFactory, catalogue: Path, tiny_model: Path) -> Path:
    return _build(tmp_path_factory.mktemp("idx"), catalogue, tiny_model, "faiss-sq8")


@pytest.fixture
def settings_for(tiny_model: Path):  # type: ignore[no-untyped-def]
    def make(index_dir: Path, **overrides: object) -> Settings:
        return Settings(index_dir=index_dir, model_dir=tiny_model, warmup_queries=1, **overrides)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    value = os.environ.get("VPS_DATASET_DIR")
    if not value:
        pytest.skip("VPS_DATASET_DIR is not set: the shared grocery dataset tests need it (.ci/run sets it)")
    path = Path(value)
    if not (path / "train.txt").is_file():
        pytest.fail(f"VPS_DATASET_DIR={value} does not hold the grocery dataset (no train.txt)")
    return path


# Every test carries the marker of its tier, the folder it lives in (`pytest -m unit`, `make test-quick`).
TIERS = ("unit", "http", "process", "browser", "deploy", "data", "ray")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = item.path.parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.path}: tests live in a tier folder ({', '.join(TIERS)})")
        item.add_marker(getattr(pytest.mark, tier))


# Figures measured by data tests, printed at the end of the run so CI logs carry them.
MEASURED: dict[str, object] = {}


@pytest.fixture
def measured() -> dict[str, object]:
    return MEASURED


def _cpu() -> str:
    """The CPU and its VNNI flags: int8 models may compute differently without VNNI (app/offline/export/quantize.py)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    first = info.split("\n\n", 1)[0]  # one processor's block
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    if "flags" not in fields:  # not x86 (ARM says "Features")
        return fields.get("model name", platform.processor() or "unknown")
    flags = fields["flags"].split()
    vnni = [f for f in flags if "vnni" in f]
    return f"{fields.get('model name', '?')}, {'VNNI: ' + ' '.join(vnni) if vnni else 'no VNNI'}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if MEASURED:
        terminalreporter.section("measured on the shared dataset")
        terminalreporter.write_line(f"cpu: {_cpu()}")
        for key, value in MEASURED.items():
            terminalreporter.write_line(f"{key}: {value}")


ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "grocery"
DEFAULT_MODEL = SHIPPED_MODEL_DIR


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo catalogue's index with the shipped model, built as `make demo` builds it."""
    out = tmp_path_factory.mktemp("demo") / "index_data"
    build_index(
        DEMO / "catalogue.csv",
        DEMO / "images",
        out,
        DEFAULT_MODEL,
        BuildOptions(progress=False),
        calibration_queries=DEMO / "calibration.csv",
    )
    return out


# PostgreSQL: the server this machine runs (trust auth). Each test run gets its own database, dropped at the end.
# CI sets VPS_REQUIRE_POSTGRES=1 (.ci/run): there an unreachable server fails instead of skipping.
POSTGRES_ADMIN_URL = os.environ.get("VPS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    import uuid

    import sqlalchemy as sa

    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            name = f"vps_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as exc:
        admin.dispose()
        message = (
            f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL} ({type(exc.orig).__name__}); set VPS_TEST_POSTGRES_URL"
        )
        if os.environ.get("VPS_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def _empty_postgres(url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()


@pytest.fixture
def fresh_postgres(postgres_url: str) -> Iterator[str]:
    """The run's PostgreSQL database, emptied after the test."""
    yield postgres_url
    _empty_postgres(postgres_url)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty catalogue database of each kind: a new SQLite file, or a new schema-less PostgreSQL database
    emptied for the test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'catalogue.db'}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    _empty_postgres(url)


def build_from_catalogue(url: str, catalogue: Path, model: Path, out: Path) -> Path:
    """An index built as `vps build-index` builds it: the CSV imported into the catalogue database, then compacted
    (its manifest carries the database's sequence number, which catalogue writes need)."""
    from app.catalogue.store import CatalogueStore
    from app.engine.embedding import OnnxEmbedder
    from app.offline.build.compact import import_catalogue

    store = CatalogueStore(url)
    store.create_schema()
    options = BuildOptions(M=8, ef_construction=40, progress=False)
    import_catalogue(catalogue, catalogue.parent, out, store, OnnxEmbedder(model), options)
    store.close()
    return out


@pytest.fixture
def catalogue_index(catalogue_url: str, catalogue: Path, tiny_model: Path, tmp_path: Path) -> Path:
    """The test catalogue's index, built through `catalogue_url` (a fresh database of each kind)."""
    return build_from_catalogue(catalogue_url, catalogue, tiny_model, tmp_path / "index")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """CLI commands configure logging for the process (JSON lines on the runner's stderr): undo it for later
    tests."""
    names = ("", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate, lg.disabled) for lg in map(logging.getLogger, names)]
    yield
    for lg, handlers, level, propagate, disabled in saved:
        lg.handlers[:], lg.level, lg.propagate, lg.disabled = handlers, level, propagate, disabled
    logging.captureWarnings(False)
