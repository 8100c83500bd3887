"""The try-it web page (GET /, its script, its icon), the OpenAPI UI (GET /docs) and the catalogue images the
page's results show.

/docs: Swagger UI from the app itself (the fastapi-swagger package's copy of its files, under /docs/assets/), not
from a CDN, so that it works on a closed network and the browser loads no third party's code. Its one inline
script (FastAPI's get_swagger_ui_html) is allowed by its hash, computed from the exact HTML served. No ReDoc.

Catalogue images: GET /v1/catalogue-images/{version}/{row} serves the image of row `row` of the *live* index
version, read from VPS_CATALOGUE_IMAGES_DIR. The client never names a path: the path comes from the index's own
item table, is resolved inside the images root (no escape), and must be a JPEG, PNG or WebP by its bytes. A
version's rows never change, so the answer is cacheable for good (`immutable`); another version is a 404.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
from importlib.resources import files
from pathlib import Path
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from app.artifacts.manifest import safe_join
from app.engine.imaging import AVIF, GIF, HEIF, JPEG, PNG, WEBP, sniff_format
from app.engine.search import SearchEngine
from app.errors import ArtifactError, EmptyBody, ImageNotFound, UnsupportedFormat
from app.service.http.routes import get_engine, get_state
from app.service.state import AppState

web = APIRouter()

_WEB = files("app.service") / "static"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_MEDIA = {
    JPEG: "image/jpeg",
    PNG: "image/png",
    WEBP: "image/webp",
    HEIF: "image/heic",
    AVIF: "image/avif",
    GIF: "image/gif",
}
# The page's icon, linked from index.html: without one every load of the page cost a 404 for /favicon.ico.
# Kept here, not in static/, so that every install has it (package data lists the page's .html and .js only).
_ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" '
    b'fill="#0b63c5"/><circle cx="14" cy="14" r="7" fill="none" stroke="#fff" stroke-width="3"/>'
    b'<path d="M19 19l6 6" stroke="#fff" stroke-width="3.5" stroke-linecap="round"/></svg>'
)
_MAX_IMAGE_BYTES = 20 * 1024 * 1024

_NOT_IN_INDEX = "no such catalogue image in the live index"


def _static(name: str, media_type: str, request: Request) -> Response:
    body = (_WEB / name).read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
    headers = {
        "ETag": etag,
        "Cache-Control": "no-cache",  # revalidate: cheap 304s, and a new release is seen at once
        "Content-Security-Policy": _CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@web.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(request: Request) -> Response:
    return _static("index.html", "text/html; charset=utf-8", request)


@web.get("/ui/app.js", include_in_schema=False)
async def script(request: Request) -> Response:
    return _static("app.js", "text/javascript; charset=utf-8", request)


@web.get("/ui/icon.svg", include_in_schema=False)
@web.get("/favicon.ico", include_in_schema=False)  # browsers ask for it on pages that link no icon (JSON answers)
async def icon() -> Response:
    return Response(
        _ICON,
        media_type="image/svg+xml",
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


DOCS_URL = "/docs"
DOCS_ASSETS = "/docs/assets"  # mounted by create_app: docs_assets()
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"  # FastAPI's default page for Swagger UI's OAuth2 flows, kept
_SWAGGER_PARAMETERS = {
    # Swagger UI asks validator.swagger.io about the schema for its badge unless told not to.
    "validatorUrl": None,
}
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.S)
# Swagger UI: its bundle and its CSS from /docs/assets, the inline script that starts it by hash ({scripts});
# icons as data: URIs in its CSS, blob: images for image answers to "Try it out", requests to this service only.
# style-src: React sets styles through the DOM (element.style), which CSP does not govern, so none inline.
_DOCS_CSP = (
    "default-src 'none'; script-src 'self' {scripts}; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
_OAUTH2_CSP = "default-src 'none'; script-src {scripts}; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"


def _script_hashes(html: bytes) -> str:
    """CSP sources for each inline script of `html`, from its exact bytes."""
    found = _INLINE_SCRIPT.findall(html)
    if not found:  # a FastAPI that changed its page: fail loudly here, not with a blank page in the browser
        raise RuntimeError("no inline script found in FastAPI's Swagger UI page")
    return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in found)


def _page_headers(csp: str) -> dict[str, str]:
    return {
        "Cache-Control": "no-cache",
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


@functools.lru_cache(maxsize=16)  # one per (title, root path): in practice one, built on the first request
def _swagger_page(title: str, openapi_url: str, root: str) -> tuple[bytes, str]:
    html = get_swagger_ui_html(
        openapi_url=root + openapi_url,
        title=f"{title} - Swagger UI",
        swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}/ui/icon.svg",
        oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
        swagger_ui_parameters=_SWAGGER_PARAMETERS,
    ).body
    return bytes(html), _DOCS_CSP.format(scripts=_script_hashes(bytes(html)))


_OAUTH2_PAGE = bytes(get_swagger_ui_oauth2_redirect_html().body)
_OAUTH2_HEADERS = _page_headers(_OAUTH2_CSP.format(scripts=_script_hashes(_OAUTH2_PAGE)))


@web.get(DOCS_URL, response_class=HTMLResponse, include_in_schema=False)
async def docs_page(request: Request) -> Response:
    # As FastAPI's own /docs: every URL under the root path the server was started with (uvicorn --root-path).
    root = str(request.scope.get("root_path", "")).rstrip("/")
    body, csp = _swagger_page(request.app.title, request.app.openapi_url, root)
    return Response(body, media_type="text/html; charset=utf-8", headers=_page_headers(csp))


@web.get(OAUTH2_REDIRECT_URL, response_class=HTMLResponse, include_in_schema=False)
async def docs_oauth2_redirect() -> Response:
    return Response(_OAUTH2_PAGE, media_type="text/html; charset=utf-8", headers=_OAUTH2_HEADERS)


class _DocsAssets(StaticFiles):
    """Swagger UI's files, revalidated on each load (a 304 from their ETag) so that an upgrade is seen at once.
    Only its asset types: the package directory also holds its Python files and their bytecode."""

    SERVED = frozenset({".js", ".css", ".png", ".html", ".map"})

    def lookup_path(self, path: str) -> tuple[str, os.stat_result | None]:
        if os.path.splitext(path)[1].lower() not in self.SERVED:
            return "", None  # a 404, as for a missing file
        return super().lookup_path(path)

    def file_response(
        self, full_path: str | os.PathLike[str], stat_result: os.stat_result, scope: Scope, status_code: int = 200
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def docs_assets() -> StaticFiles:
    """The app for DOCS_ASSETS: the fastapi-swagger package's own directory of Swagger UI files, nothing else."""
    return _DocsAssets(packages=[("fastapi_swagger", "resources")])


@web.get(
    "/v1/catalogue-images/{version}/{row}",
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}}, 404: {}},
    response_class=Response,
)
async def catalogue_image(
    version: str,
    row: int,
    state: Annotated[AppState, Depends(get_state)],
    engine: Annotated[SearchEngine, Depends(get_engine)],
) -> Response:
    root = state.settings.catalogue_images_dir
    if root is None or version != engine.manifest.version or not 0 <= row < len(engine.items):
        raise ImageNotFound(_NOT_IN_INDEX)
    data, media = await anyio.to_thread.run_sync(read_catalogue_file, root, engine.items.get(row).get("image"))
    return Response(
        data,
        media_type=media,
        headers={
            "Cache-Control": "public, max-age=31536000, immutable",  # rows of a version never change
            "ETag": f'"{version}-{row}"',
            "X-Content-Type-Options": "nosniff",
        },
    )


def read_catalogue_file(root: Path, rel: object) -> tuple[bytes, str]:
    """A catalogue image's bytes and media type from the images root: never outside it, whatever the item table
    or the catalogue database says, and only a JPEG, PNG or WebP by its bytes."""
    if not isinstance(rel, str) or not rel:
        raise ImageNotFound(_NOT_IN_INDEX)
    try:
        path = safe_join(root, rel)
    except ArtifactError:
        raise ImageNotFound(_NOT_IN_INDEX) from None
    if not path.is_file() or path.stat().st_size > _MAX_IMAGE_BYTES:
        raise ImageNotFound(_NOT_IN_INDEX)
    data = path.read_bytes()
    try:
        return data, _MEDIA[sniff_format(data)]
    except (UnsupportedFormat, EmptyBody, KeyError):
        raise ImageNotFound(_NOT_IN_INDEX) from None
