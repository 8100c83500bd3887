"""`vps search`: photos searched through a running service (`--url`, POST /search) or an index directory in
process (`--index`), printed as a table per photo or as JSON lines. Both give the same JSON shape: the in-process
path builds it with the route's own response builder. In process, the index version is searched as built: live
catalogue changes (app/catalogue) are the running service's.

Standard library HTTP (urllib): the serving install carries no HTTP client library, and one multipart body per
photo needs none.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.errors import ServiceError

TIMEOUT_S = 60.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is answered as the error it is here: following it could lead to another host or scheme."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclass(frozen=True)
class Query:
    k: int | None = None
    category: str | None = None
    filter: str | None = None
    bbox: str | None = None
    bbox_units: str = "px"
    offset: int = 0

    def params(self) -> dict[str, str]:
        raw = {
            "k": self.k,
            "category": self.category,
            "filter": self.filter,
            "bbox": self.bbox,
            "bbox_units": self.bbox_units if self.bbox else None,
            "offset": self.offset or None,
        }
        return {k: str(v) for k, v in raw.items() if v is not None}


@dataclass(frozen=True)
class Answer:
    """One photo's outcome: the service's JSON answer, or its error (code and message)."""

    photo: Path
    body: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class Unreachable(Exception):
    """The service at --url did not answer."""


def search_url(url: str, photos: list[Path], query: Query) -> Iterator[Answer]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"--url {url!r}: expected http://host:port or https://host")
    endpoint = urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, parsed.path.rstrip("/") + "/search", "", ""))
    endpoint += "?" + urllib.parse.urlencode(query.params())
    for photo in photos:
        data = _read(photo)
        if isinstance(data, dict):
            yield Answer(photo, error=data)
            continue
        boundary = uuid.uuid4().hex
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked above: http or https only
            endpoint, data=body, method="POST", headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        try:
            with _OPENER.open(request, timeout=TIMEOUT_S) as response:  # http(s) only: checked above, no redirects
                yield Answer(photo, body=json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            yield Answer(photo, error=_error_of(exc))
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"{url}: the service did not answer ({reason})") from exc


def search_index(index_dir: Path | None, model_dir: Path, photos: list[Path], query: Query) -> Iterator[Answer]:
    """In process: the index's engine (`index_dir`, else VPS_INDEX_DIR) with the service's defaults (VPS_*
    settings apply)."""
    from app.service.config import Settings
    from app.service.engines import load_engine, search_defaults
    from app.service.http.routes import build_params, response_of
    from app.service.http.schemas import SearchQuery

    chosen: dict[str, Any] = {"index_dir": index_dir} if index_dir is not None else {}
    settings = Settings(**chosen, model_dir=model_dir, warmup_queries=0, verify_shards="before_ready")
    engine = load_engine(settings)
    defaults = search_defaults(settings)
    try:
        parsed = SearchQuery.model_validate(query.params())
    except ValueError as exc:
        raise ValueError(f"invalid search option: {exc}") from None
    for photo in photos:
        data = _read(photo)
        if isinstance(data, dict):
            yield Answer(photo, error=data)
            continue
        try:
            params = build_params(engine, defaults, parsed)
            outcome = engine.search_image(data, params)
        except ServiceError as exc:
            yield Answer(photo, error={"code": exc.code, "message": exc.message})
            continue
        total = sum(outcome.timings_s.values())
        body = response_of(engine, outcome, total, images=settings.catalogue_images_dir is not None)
        yield Answer(photo, body=body)


def _read(photo: Path) -> bytes | dict[str, Any]:
    try:
        return photo.read_bytes()
    except OSError as exc:
        return {"code": "unreadable_file", "message": f"{photo}: {exc.strerror or type(exc).__name__}"}


def _error_of(exc: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        error = json.loads(exc.read())["error"]
        return {"code": str(error["code"]), "message": str(error["message"]), "status": exc.code}
    except (ValueError, KeyError, TypeError):
        return {"code": f"http_{exc.code}", "message": str(exc.reason), "status": exc.code}


def table(answer: Answer, start: int = 0) -> str:
    """A readable block for one photo: a header line, then rank, score, SKU, category and title."""
    if answer.error is not None:
        return f"{answer.photo}: error {answer.error['code']}: {answer.error['message']}"
    body = answer.body or {}
    results = body.get("results", [])
    routing = body.get("routing", {})
    shards = [p["category"] for p in routing.get("probed", [])] + [p["category"] for p in routing.get("added", [])]
    head = f"{answer.photo}: {len(results)} results" + ("" if body.get("match", True) else " (no match)")
    head += f", {body.get('timings_ms', {}).get('total', 0):.1f} ms, searched {', '.join(shards[:5])}"
    head += f" +{len(shards) - 5} more" if len(shards) > 5 else ""
    lines = [head]
    if results:
        rank_w = len(str(len(results)))
        sku_w = max(3, *(len(r["sku"]) for r in results))
        cat_w = max(8, *(len(r["category"]) for r in results))
        lines.append(f"  {'#':>{rank_w}}  score   {'sku':<{sku_w}}  {'category':<{cat_w}}  title")
        for i, r in enumerate(results, start + 1):
            title = r.get("title") or ""
            lines.append(f"  {i:>{rank_w}}  {r['score']:.3f}  {r['sku']:<{sku_w}}  {r['category']:<{cat_w}}  {title}")
    return "\n".join(lines)


def json_line(answer: Answer) -> str:
    doc: dict[str, Any] = {"photo": str(answer.photo)}
    doc.update({"response": answer.body} if answer.error is None else {"error": answer.error})
    return json.dumps(doc, ensure_ascii=False)
