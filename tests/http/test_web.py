"""The web page's server side: the page and its script, and catalogue images served only for rows of the live
index version (never a client-named path), with caching headers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import encode, live_server, product_image


@pytest.fixture(scope="module")
def server(faiss_index: Path, tiny_model: Path, catalogue: Path) -> Iterator[str]:
    settings = Settings(
        index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, catalogue_images_dir=catalogue.parent
    )
    with live_server(create_app(settings)) as base:
        yield base


def test_page_and_script_are_self_contained_with_a_strict_policy(server: str) -> None:
    page = httpx.get(f"{server}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert '<script src="/ui/app.js"></script>' in page.text
    script = httpx.get(f"{server}/ui/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert 'fetch("/search?k="' in script.text
    again = httpx.get(f"{server}/", headers={"If-None-Match": page.headers["etag"]})
    assert again.status_code == 304


def test_the_region_selector_needs_nothing_the_policy_forbids(server: str) -> None:
    """The box drawn on the photo: markup in the page, behaviour in /ui/app.js. script-src 'self' refuses inline
    scripts and on* attributes, so the page must have none; the script sends the box as fractions."""
    page = httpx.get(f"{server}/").text
    assert re.findall(r"<script\b[^>]*>", page) == ['<script src="/ui/app.js">']
    assert not re.search(r"\son[a-z]+\s*=", page)  # an inline handler would be refused by the CSP
    for marker in ('id="stage" tabindex="0"', 'id="box-status" aria-live="polite"', 'id="clear-box" type="button"'):
        assert marker in page
    script = httpx.get(f"{server}/ui/app.js").text
    assert '"&bbox=" +' in script and '"&bbox_units=fraction"' in script
    assert all(f'addEventListener("{e}"' in script for e in ("pointerdown", "pointermove", "pointerup", "keydown"))


def test_the_page_links_an_icon_that_is_served(server: str) -> None:
    """Without a linked icon every page load asked for /favicon.ico and got a 404."""
    page = httpx.get(f"{server}/").text
    assert '<link rel="icon" href="/ui/icon.svg" type="image/svg+xml">' in page
    for path in ("/ui/icon.svg", "/favicon.ico"):  # the second for pages that link none (JSON answers)
        icon = httpx.get(f"{server}{path}")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml", path
        assert icon.content.startswith(b"<svg") and b"<script" not in icon.content
        assert "max-age" in icon.headers["cache-control"]
    assert httpx.get(f"{server}/openapi.json").json()["paths"].keys().isdisjoint({"/ui/icon.svg", "/favicon.ico"})


def test_results_link_their_catalogue_image_which_is_cacheable(server: str, catalogue: Path) -> None:
    r = httpx.post(f"{server}/search", content=encode(product_image("white-milk", 8)), params={"k": 3})
    top = r.json()["results"][0]
    assert top["sku"] == "white-milk" and top["image_url"].startswith("/v1/catalogue-images/")
    image = httpx.get(f"{server}{top['image_url']}")
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == (catalogue.parent / top["image"]).read_bytes()
    assert "immutable" in image.headers["cache-control"] and image.headers["etag"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/catalogue-images/20000101T000000Z-00000000/0", 404, "image_not_found"),  # not the live version
        ("/v1/catalogue-images/{version}/9999", 404, "image_not_found"),
        ("/v1/catalogue-images/{version}/-1", 404, "image_not_found"),
        ("/v1/catalogue-images/{version}/abc", 422, "invalid_parameter"),
        ("/v1/catalogue-images/{version}/..%2F..%2Fcatalogue.csv", 404, "not_found"),
        ("/v1/catalogue-images/../../etc/passwd", 404, "not_found"),
    ],
)
def test_only_rows_of_the_live_index_are_served(server: str, path: str, status: int, code: str) -> None:
    version = httpx.get(f"{server}/v1/info").json()["index"]["version"]
    r = httpx.get(f"{server}{path.format(version=version)}")
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_no_images_dir_means_no_image_urls(faiss_index: Path, tiny_model: Path) -> None:
    with live_server(create_app(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0))) as base:
        r = httpx.post(f"{base}/search", content=encode(product_image("red-apple", 8)))
        assert all(item["image_url"] is None for item in r.json()["results"])
        version = r.json()["index_version"]
        assert httpx.get(f"{base}/v1/catalogue-images/{version}/0").status_code == 404


def test_a_missing_file_is_404_not_500(faiss_index: Path, tiny_model: Path, catalogue: Path, tmp_path: Path) -> None:
    empty = tmp_path / "images"
    empty.mkdir()
    settings = Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, catalogue_images_dir=empty)
    with live_server(create_app(settings)) as base:
        version = httpx.get(f"{base}/v1/info").json()["index"]["version"]
        r = httpx.get(f"{base}/v1/catalogue-images/{version}/0")
        assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found"
