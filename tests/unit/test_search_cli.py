"""`vps search`: photos searched in process (--index) or through a running service (--url, real HTTP), printed as
a table per photo or JSON lines; a photo that cannot be searched prints its error in its place and exits 3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from app.cli import EXIT_INPUT, EXIT_UNEXPECTED, EXIT_USAGE, cli
from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import encode, free_port, live_server, product_image

pytestmark = pytest.mark.usefixtures("restore_logging")


def vps(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    out = []
    for sku in ("blue-milk", "orange-juice"):
        p = root / f"{sku}.jpg"
        p.write_bytes(encode(product_image(sku, 77), "JPEG"))
        out.append(p)
    bad = root / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really")
    return [*out, bad]


@pytest.fixture(scope="module")
def server(faiss_index: Path, tiny_model: Path) -> Iterator[str]:
    with live_server(create_app(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0))) as base:
        yield base


def test_in_process_prints_a_table_per_photo(faiss_index: Path, tiny_model: Path, photos: list[Path]) -> None:
    r = vps("search", "--index", faiss_index, "--model", tiny_model, "--k", 3, *photos[:2])
    assert r.exit_code == 0, r.output
    blocks = r.stdout.strip().split("\n" + str(photos[1]))
    assert blocks[0].startswith(f"{photos[0]}: 3 results")
    first = blocks[0].splitlines()
    assert first[1].split()[:4] == ["#", "score", "sku", "category"]
    assert first[2].split()[2] == "blue-milk" and first[2].split()[0] == "1"
    assert "orange-juice" in blocks[1].splitlines()[2]


def test_through_a_service_json_lines_match_the_in_process_answer(
    server: str, faiss_index: Path, tiny_model: Path, photos: list[Path]
) -> None:
    remote = vps("search", "--url", server, "--json", "--k", 2, "--category", "juice", photos[1])
    local = vps("search", "--index", faiss_index, "--model", tiny_model, "--json", "--k", 2, "--category", "juice",
                photos[1])  # fmt: skip
    assert remote.exit_code == local.exit_code == 0, remote.output + local.output
    a, b = json.loads(remote.stdout), json.loads(local.stdout)
    assert a["photo"] == b["photo"] == str(photos[1])
    assert [x["sku"] for x in a["response"]["results"]] == [x["sku"] for x in b["response"]["results"]]
    assert a["response"]["results"][0]["sku"] == "orange-juice" and a["response"]["routing"]["forced"]


def test_a_bad_photo_prints_its_error_and_exits_3(server: str, photos: list[Path]) -> None:
    r = vps("search", "--url", server, photos[0], photos[2], photos[0].with_name("missing.jpg"))
    assert r.exit_code == EXIT_INPUT
    assert f"{photos[2]}: error corrupt_image:" in r.stdout
    assert "missing.jpg: error unreadable_file:" in r.stdout
    assert r.stdout.startswith(f"{photos[0]}: ")
    assert "2 of 3 photos could not be searched" in r.stderr


def test_bad_options_and_an_unreachable_service(photos: list[Path], server: str) -> None:
    r = vps("search", "--url", server, "--filter", "brand=", photos[0])
    assert r.exit_code == EXIT_INPUT and "invalid_filter" in r.stdout  # the service's 422, per photo
    r = vps("search", "--url", "ftp://example", photos[0])
    assert r.exit_code == EXIT_USAGE and "expected http://host:port" in r.stderr
    r = vps("search", "--url", f"http://127.0.0.1:{free_port()}", photos[0])
    assert r.exit_code == EXIT_UNEXPECTED and "the service did not answer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
