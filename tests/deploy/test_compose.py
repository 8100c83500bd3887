"""docker-compose.yml, without a Docker engine: the file validates against the Compose Specification's JSON schema
(vendored: compose-spec.json, from github.com/compose-spec/compose-spec schema/compose-spec.json at commit
170098ba07d9f53c383a41bfd4c5166b0a4529a6, Apache-2.0), the services agree with each other and with the app's
settings, and the `index` and `vps` services' own commands and environments run here against a PostgreSQL
database: seed once, serve, take a write, compact, serve the compacted version."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from sqlalchemy.engine import make_url

from app.service.config import Settings
from tests.deploy.test_container import _instructions
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = Path(__file__).with_name("compose-spec.json")
NOT_SETTINGS = {"VPS_WORKERS"}  # read by `vps serve --workers`
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set: what `docker compose up` uses on a fresh machine."""
    assert "$" not in _DEFAULTED.sub("", value), f"{value!r}: a variable without a default"
    return _DEFAULTED.sub(lambda m: m[2], value)


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = [
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(compose())
    ]
    assert not errors, "\n".join(errors)


def test_the_catalogue_database_service() -> None:
    services = compose()["services"]
    pg = services["postgres"]
    assert re.fullmatch(r"postgres:15\.\d+(-[a-z0-9.]+)?", pg["image"]), f"{pg['image']}: pin a PostgreSQL 15 tag"
    assert "ports" not in pg, "the database answers on the compose network only"
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "pg_isready" and "--host=127.0.0.1" in test  # TCP: not init's socket
    volume, data = pg["volumes"][0].split(":")
    assert data == "/var/lib/postgresql/data" and volume in compose()["volumes"]  # a named volume, not the host's
    env = pg["environment"]
    assert "${POSTGRES_PASSWORD:-" in env["POSTGRES_PASSWORD"], "the password comes from the environment"
    assert "ALL" in pg["cap_drop"] and pg["security_opt"] == ["no-new-privileges:true"]

    # Every service that reads the database reaches this one, as its user, with its password.
    for name in ("vps", "index"):
        url = make_url(interpolate(services[name]["environment"]["VPS_CATALOGUE_URL"]))
        assert url.drivername == "postgresql+psycopg" and (url.host, url.port) == ("postgres", 5432), name
        assert (url.username, url.database) == (env["POSTGRES_USER"], env["POSTGRES_DB"]), name
        assert url.password == interpolate(env["POSTGRES_PASSWORD"]), name
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy", name


def test_the_service_stays_hardened_and_reads_the_index_read_only() -> None:
    services = compose()["services"]
    vps = services["vps"]
    assert vps["read_only"] is True and vps["tmpfs"] == ["/tmp"] and vps["cap_drop"] == ["ALL"]  # noqa: S108
    assert vps["user"] == "10001:10001" and vps["security_opt"] == ["no-new-privileges:true"]
    env = {k: interpolate(v) for k, v in vps["environment"].items()}
    fields = {f"VPS_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields | NOT_SETTINGS, set(env) - fields - NOT_SETTINGS
    settings = Settings(**{k[4:].lower(): v for k, v in env.items() if k not in NOT_SETTINGS and v != ""})
    assert settings.compact_above == 0, "the index volume is read-only in `vps`: it must never compact"
    assert settings.index_watch_s > 0, "compacted versions are published by `index`: watch CURRENT"

    # The index volume: read-only in `vps` where VPS_INDEX_DIR points, written by `index` (its only writer).
    mounts = {v.split(":")[1]: v.split(":") for v in vps["volumes"]}
    assert mounts[str(settings.index_dir)][2] == "ro"
    volume = mounts[str(settings.index_dir)][0]
    assert volume in compose()["volumes"]
    writers = [
        name
        for name, service in services.items()
        for v in service.get("volumes", [])
        if v.split(":")[0] == volume and not v.endswith(":ro")
    ]
    assert writers == ["index"], writers
    index = services["index"]
    assert f"--out {settings.index_dir}" in " ".join(index["command"])
    assert index["read_only"] is True and index["cap_drop"] == ["ALL"] and index["restart"] == "no"
    assert vps["depends_on"]["index"]["condition"] == "service_completed_successfully"
    for service in services.values():
        for v in service.get("volumes", []):
            if v.startswith("./"):
                assert (ROOT / v.split(":")[0]).exists(), f"{v}: not in the repository"


# --- the services' own commands, run here --------------------------------------------------------------------------


def _image_paths(tmp_path: Path) -> dict[str, Path]:
    """Where each path of the containers is here: the Dockerfile's COPY destinations, compose's bind mounts and
    named volumes, /tmp."""
    paths: dict[str, Path] = {"/tmp": tmp_path / "tmp"}  # noqa: S108
    for keyword, rest in _instructions():
        parts = rest.split()
        if keyword == "COPY" and not parts[0].startswith("--") and len(parts) == 2 and parts[1].startswith("/"):
            paths[parts[1]] = ROOT / parts[0]
    for service in compose()["services"].values():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            paths[target] = ROOT / source if source.startswith("./") else tmp_path / f"volume-{source}"
    return dict(sorted(paths.items(), key=lambda kv: -len(kv[0])))


def _here(value: str, paths: dict[str, Path]) -> str:
    for word in value.split():
        for inside, outside in paths.items():
            if word == inside or word.startswith(inside + "/"):
                value = value.replace(word, str(outside) + word[len(inside) :])
                break
    return value


def _env(service: str, paths: dict[str, Path], database: str, tmp_path: Path) -> dict[str, str]:
    """The image's ENV and the service's environment, with paths mapped here and the test's database."""
    env_line = next(rest for kw, rest in _instructions() if kw == "ENV")
    env = {k: v for k, v in re.findall(r"(\w+)=(\S+)", env_line) if k != "PATH"}
    env |= {k: interpolate(v) for k, v in compose()["services"][service].get("environment", {}).items()}
    env = {k: _here(v, paths) for k, v in env.items()}
    env |= {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "VPS_CATALOGUE_URL": database,
    }
    return env


def _run_in_index(argv: list[str], paths: dict[str, Path], env: dict[str, str]) -> str:
    result = subprocess.run(
        [_here(a, paths) for a in argv], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@contextmanager
def _serving(env: dict[str, str], log: Path) -> Iterator[str]:
    """The image's CMD with the `vps` service's environment, on a free port of 127.0.0.1 (its log in a file: a
    pipe nobody reads would stall it)."""
    port = free_port()
    command = json.loads(next(rest for kw, rest in _instructions() if kw == "CMD"))
    assert command[-4:] == ["--host", "0.0.0.0", "--port", "8000"]
    vps = shutil.which(command[0], path=env["PATH"])
    assert vps is not None
    argv = [vps, *command[1:-4], "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _until(lambda: _get(base, "/readyz") == 200, 120, proc, log)
            yield base
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _get(base: str, path: str) -> int:
    try:
        return httpx.get(base + path, timeout=5).status_code
    except httpx.TransportError:
        return 0


def _until(
    check: Any, seconds: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None, what: str = ""
) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(log.read_text()[-3000:] if log is not None else "the server exited")
        assert time.monotonic() < deadline, f"not within {seconds} s: {what or check}"
        time.sleep(0.5)


def _top_sku(base: str, photo: Path) -> str:
    r = httpx.post(f"{base}/search?k=3", files={"image": photo.read_bytes()}, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["results"][0]["sku"])


def _metric(base: str, line_start: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


@pytest.mark.parametrize("catalogue_url", ["postgresql"], indirect=True)  # an empty database, emptied after
def test_compose_seeds_once_serves_live_writes_and_compacts(tmp_path: Path, catalogue_url: str) -> None:
    services = compose()["services"]
    paths = _image_paths(tmp_path)
    index_env = _env("index", paths, catalogue_url, tmp_path)
    serve_env = _env("vps", paths, catalogue_url, tmp_path) | {"VPS_ADMIN_TOKEN": "compose-test-token"}
    index_dir = Path(serve_env["VPS_INDEX_DIR"])
    index_dir.mkdir(parents=True)

    def versions() -> list[str]:
        return sorted(p.name for p in index_dir.iterdir() if (p / "manifest.json").is_file())

    # The first start: the demo catalogue into the database and a first version from it.
    out = _run_in_index(services["index"]["command"], paths, index_env)
    assert "built " in out and (index_dir / "CURRENT").is_file(), out
    first = versions()
    admin = {"Authorization": "Bearer compose-test-token"}
    photo = ROOT / "examples/grocery/images/val/Fruit/Avocado/Avocado_001.jpg"
    with _serving(serve_env, tmp_path / "vps.log") as base:
        r = httpx.put(f"{base}/v1/products/Avocado", json={"category": "Avocado", "title": "Renamed"}, headers=admin)
        assert r.status_code == 200, r.text
        r = httpx.put(f"{base}/v1/products/compose-check", json={"category": "Avocado"}, headers=admin)
        assert r.status_code == 200, r.text
        r = httpx.post(
            f"{base}/v1/products/compose-check/images", files={"image": photo.read_bytes()}, headers=admin, timeout=30
        )
        assert r.status_code == 201, r.text
        head = r.json()["seq"]
        _until(lambda: _top_sku(base, photo) == "compose-check", 10)  # every worker within VPS_SYNC_S
        _until(lambda: _metric(base, "vps_catalogue_delta_items") >= 1, 10)

        # Later starts leave the database and the index alone: an import would undo the API's changes.
        _run_in_index(services["index"]["command"], paths, index_env)
        assert versions() == first
        product = httpx.get(f"{base}/v1/products/Avocado", headers=admin).json()
        assert product["title"] == "Renamed", product

        # The compaction the compose file's header shows, in the `index` service; `vps` loads it by its watch.
        shown = re.search(r"docker compose run --rm index (vps compact .*)", COMPOSE.read_text())
        assert shown, "docker-compose.yml shows no compaction command"
        out = _run_in_index(shown[1].split(), paths, index_env)
        assert "built " in out, out
        compacted = (index_dir / "CURRENT").read_text().strip()
        assert compacted not in first

        def serves_compacted() -> bool:
            index = httpx.get(f"{base}/v1/info", timeout=5).json()["index"]
            return bool(index["version"] == compacted and index["catalogue_seq"] == head)

        _until(lambda: all(serves_compacted() for _ in range(6)), 60)  # both workers
        assert _top_sku(base, photo) == "compose-check"  # now from the version itself

        # The version holds every change so far: nothing is left to serve from the delta (the dashboard's saw-tooth,
        # and what keeps VpsCatalogueDeltaLarge and VPS_COMPACT_ABOVE from firing again at once).
        def delta() -> float:
            return _metric(base, "vps_catalogue_delta_items")

        _until(lambda: delta() == 0, 10, what="the delta still serves images after compaction")
        assert _metric(base, "vps_catalogue_compactions_total") == 0  # VPS_COMPACT_ABOVE=0: never in `vps`
    assert os.access(index_dir / compacted / "manifest.json", os.R_OK)
