"""/docs: Swagger UI served by the app itself (no CDN), under a CSP that allows its one inline script by hash."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import live_server

# The URLs a page makes the browser load: scripts, stylesheets, icons.
_ASSET = re.compile(r"<(?:script|link)\b[^>]*\b(?:src|href)=\"([^\"]*)\"", re.I)
_INLINE = re.compile(r"<script>(.*?)</script>", re.S)
_TYPES = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@pytest.fixture(scope="module")
def server(faiss_index: Path, tiny_model: Path) -> Iterator[str]:
    with live_server(create_app(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0))) as base:
        yield base


def _directives(csp: str) -> dict[str, list[str]]:
    return {d.split()[0]: d.split()[1:] for d in (p.strip() for p in csp.split(";")) if d}


def test_docs_loads_only_same_origin_assets_of_the_right_type(server: str) -> None:
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    tags = re.findall(r"<(?:script|link)\b[^>]*>", page.text, re.I)
    assert tags and not any("http" in tag for tag in tags), tags  # no origin named: all same-origin
    assets = _ASSET.findall(page.text)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css", "/ui/icon.svg"} == set(assets)
    for url in assets:
        r = httpx.get(f"{server}{url}")
        assert r.status_code == 200 and len(r.content) > 100, url
        assert _TYPES[Path(url).suffix] in r.headers["content-type"], (url, r.headers["content-type"])
        assert r.headers["x-content-type-options"] == "nosniff", url
    assert "SwaggerUIBundle" in httpx.get(f"{server}/docs/assets/swagger-ui-bundle.js").text


def test_docs_csp_allows_exactly_its_inline_script_by_hash(server: str) -> None:
    page = httpx.get(f"{server}/docs")
    csp = _directives(page.headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    assert "'unsafe-inline'" not in csp["style-src"]
    every_source = {s for sources in csp.values() for s in sources}
    assert not any(s.startswith("http") or s == "*" for s in every_source), every_source  # no CDN, no wildcard
    inline = _INLINE.findall(page.text)
    assert len(inline) == 1 and "SwaggerUIBundle(" in inline[0]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert csp["script-src"] == ["'self'", f"'sha256-{digest}'"]  # the script as served, nothing else inline
    assert page.headers["x-content-type-options"] == "nosniff"


def test_the_oauth2_redirect_page_is_kept_with_its_script_hashed(server: str) -> None:
    page = httpx.get(f"{server}/docs/oauth2-redirect")
    assert page.status_code == 200 and "swaggerUIRedirectOauth2" in page.text
    csp = _directives(page.headers["content-security-policy"])
    (inline,) = _INLINE.findall(page.text)
    digest = base64.b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert csp["script-src"] == [f"'sha256-{digest}'"] and csp["frame-ancestors"] == ["'none'"]


def test_schema_still_served_redoc_gone_and_assets_confined(server: str) -> None:
    spec = httpx.get(f"{server}/openapi.json")
    assert spec.status_code == 200 and "/search" in spec.json()["paths"]
    assert not {"/docs", "/docs/oauth2-redirect"} & spec.json()["paths"].keys()
    assert httpx.get(f"{server}/redoc").status_code == 404  # dropped: Swagger UI is the one API page
    for path in (
        "/docs/assets/",
        "/docs/assets/nope.js",
        "/docs/assets/../main.py",
        "/docs/assets/%2e%2e/main.py",
        "/docs/assets/__init__.py",  # the package directory holds its own code: never served
    ):
        r = httpx.get(f"{server}{path}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    again = httpx.get(f"{server}/docs/assets/swagger-ui.css")
    cached = httpx.get(f"{server}/docs/assets/swagger-ui.css", headers={"If-None-Match": again.headers["etag"]})
    assert cached.status_code == 304 and again.headers["cache-control"] == "no-cache"


def test_docs_and_assets_have_bounded_route_labels(server: str) -> None:
    for path in ("/docs", "/docs/assets/swagger-ui.css"):
        assert httpx.get(f"{server}{path}").status_code == 200
    text = httpx.get(f"{server}/metrics").text
    assert re.search(r'^vps_requests_total\{route="/docs",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^vps_requests_total\{route="/docs/assets",status="200"\} [1-9]', text, re.M)
    assert "swagger-ui.css" not in text  # the file is not a label
