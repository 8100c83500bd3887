"""Routes: POST /search, health, readiness, info, metrics. A request goes: read_image (byte cap) ->
runner (bounded pool) -> SearchEngine.search_image (app/engine/search.py) -> SearchResponse."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from pydantic_core import to_json

from app.engine.imaging import MAX_COLLECTED, Collected, Region
from app.engine.search import STAGES, Hit, SearchDefaults, SearchEngine, SearchOutcome, SearchParams, resolve_params
from app.errors import EmptyBody, ImageTooLarge, NotReady, ServiceError
from app.service.capture import answer_summary
from app.service.http.errors import request_id_of as rid_of
from app.service.http.schemas import (
    BatchResponse,
    ErrorResponse,
    Health,
    Info,
    SearchQuery,
    SearchResponse,
)
from app.service.http.upload import read_image, read_image_parts
from app.service.state import AppState

router = APIRouter()
log = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 413, 415, 422, 500, 503)}


def _query_parameters() -> list[dict[str, Any]]:
    """SearchQuery's fields as OpenAPI query parameters, as FastAPI would list them: /search validates its query
    string itself (see `search_query`), so FastAPI does not see them."""
    properties = SearchQuery.model_json_schema()["properties"]
    return [
        {"name": name, "in": "query", "required": False, "schema": schema, "description": schema.get("description")}
        for name, schema in properties.items()
    ]


_SEARCH_OPENAPI: dict[str, Any] = {
    "parameters": _query_parameters(),
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {"image": {"type": "string", "format": "binary"}},
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "image/heic": {"schema": {"type": "string", "format": "binary"}},
            "image/heif": {"schema": {"type": "string", "format": "binary"}},
            "image/avif": {"schema": {"type": "string", "format": "binary"}},
            "image/gif": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


# Dependencies are `async def`: FastAPI runs plain `def` dependencies in a thread pool, two thread hops per
# request for a dictionary lookup (profiled).
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.vps
    return state


async def get_engine(state: Annotated[AppState, Depends(get_state)]) -> SearchEngine:
    """The engine a request runs on, taken once at its start."""
    return state.require_engine()


def search_query(request: Request) -> SearchQuery:
    """The query string as one SearchQuery, validated in one pydantic-core call; errors become the same 422
    `invalid_parameter` as FastAPI's own parameter validation."""
    try:
        return SearchQuery.model_validate(dict(request.query_params))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("query", *e["loc"])} for e in errors]) from None


# The hot path takes only the Request: FastAPI's dependency and parameter machinery cost more event-loop CPU per
# request than the parsing it does (under cProfile ~30% of the app's time for a search; together with the direct
# multipart parse, the app's CPU per request fell from 692-752 to 538-559 us), and the loop's CPU is taken from
# inference on a saturated node (docs/benchmarks.md, service overhead).
@router.post("/search", response_model=SearchResponse, responses=_ERRORS, openapi_extra=_SEARCH_OPENAPI)
async def search(request: Request) -> Response:
    t0 = time.perf_counter()
    state: AppState = request.app.state.vps
    engine = state.require_engine()
    query = search_query(request)
    settings = state.settings
    # Full (every slot and place in the queue taken): refuse before reading a byte (cheap shedding). Otherwise
    # the body is read before admission, so a slow upload holds a connection (bounded by the server's request
    # cap), never one of the few compute slots; admission (a short bounded wait) follows once the body is in.
    state.runner.refuse_if_full(settings.max_queued)
    data = await read_image(request, settings.max_upload_bytes)
    params = build_params(engine, state.search_defaults, query)
    warnings = Collected()  # what the decode's libraries warn about: counted and logged once, never printed
    try:
        async with state.runner.admit(settings.queue_wait_s, settings.max_queued) as ticket:
            outcome = await state.runner.run(
                ticket, settings.request_timeout_s, engine.search_image, data, params, warnings
            )
    finally:
        _report_warnings(state, request, warnings)
    total = time.perf_counter() - t0
    _observe(state, outcome)
    # A random draw; when sampled, a non-blocking put (app/service/shadow.py).
    state.shadow.offer(engine, params, outcome)
    body = response_of(engine, outcome, total, images=settings.catalogue_images_dir is not None)
    state.capture.offer(  # a random draw; when sampled, a non-blocking put (app/service/capture.py)
        data,
        lambda: answer_summary(body, query.model_dump(exclude_defaults=True)),
        rid_of(request),
    )
    # Serialised once by pydantic-core, not validated against response_model on the way out (see response_of).
    return Response(to_json(body, inf_nan_mode="null"), media_type="application/json")


_BATCH_OPENAPI: dict[str, Any] = {
    "parameters": _SEARCH_OPENAPI["parameters"],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "maxItems": 16,
                            "description": "1 to VPS_MAX_BATCH_IMAGES (16) parts named `image`, searched in order",
                        }
                    },
                }
            }
        },
    },
}


@router.post("/v1/search/batch", response_model=BatchResponse, responses=_ERRORS, openapi_extra=_BATCH_OPENAPI)
async def search_batch(request: Request) -> Response:
    """Up to 16 images with POST /search's parameters: one entry per image, in order; an image that cannot be
    searched gets its own error entry and the others are answered. Inference runs once for the whole batch."""
    t0 = time.perf_counter()
    state: AppState = request.app.state.vps
    engine = state.require_engine()
    query = search_query(request)
    settings = state.settings
    state.runner.refuse_if_full(settings.max_queued)
    parts = await read_image_parts(
        request, settings.max_upload_bytes, settings.max_batch_images, settings.max_batch_bytes
    )
    params = build_params(engine, state.search_defaults, query)
    state.metrics.batch_images.inc(len(parts))
    refused: dict[int, ServiceError] = {
        i: ImageTooLarge() if len(p) > settings.max_upload_bytes else EmptyBody()
        for i, p in enumerate(parts)
        if not p or len(p) > settings.max_upload_bytes
    }
    images = [p for i, p in enumerate(parts) if i not in refused]
    outcomes = await _run_batch(state, request, engine, images, params)
    searched = iter(outcomes)
    rid = getattr(request.state, "request_id", None)
    entries: list[dict[str, Any]] = []
    for i in range(len(parts)):
        outcome = refused.get(i) or next(searched)
        if isinstance(outcome, ServiceError):
            state.metrics.batch_image_errors.labels(code=outcome.code).inc()
            entries.append({"index": i, "error": {"code": outcome.code, "message": outcome.message, "request_id": rid}})
            continue
        _observe(state, outcome)
        item = response_of(engine, outcome, time.perf_counter() - t0, images=settings.catalogue_images_dir is not None)
        entries.append({"index": i, "response": item})
    body = BatchResponse.model_validate(
        {
            "results": entries,
            "index_version": engine.manifest.version,
            "timings_ms": {"total": round((time.perf_counter() - t0) * 1000, 3)},
        }
    )
    return Response(body.model_dump_json(), media_type="application/json")


async def _run_batch(
    state: AppState, request: Request, engine: SearchEngine, images: list[bytes], params: SearchParams
) -> list[SearchOutcome | ServiceError]:
    """The batch's images searched in parts side by side, one per admission slot free now (measured,
    scripts/bench_batch.py: one inference call over 16 photos ran no faster than 16 requests one after another on
    these 2 cores); outcomes in the order of `images`."""
    settings = state.settings
    collectors: list[Collected] = []
    try:
        async with state.runner.admit(settings.queue_wait_s, settings.max_queued) as ticket:
            extra = state.runner.take_free(min(settings.pool_threads, len(images)) - 1) if images else 0
            n = 1 + extra
            chunks = [images[i::n] for i in range(n)] if images else []
            collectors = [Collected() for _ in chunks]
            answered = await state.runner.run_parts(
                ticket,
                settings.request_timeout_s,
                engine.search_images,
                [(chunk, params, w) for chunk, w in zip(chunks, collectors, strict=True)],
                extra,
            )
    finally:
        warnings = Collected()
        for w in collectors:
            warnings.count += w.count
            warnings.messages += w.messages[: MAX_COLLECTED - len(warnings.messages)]
        _report_warnings(state, request, warnings)
    return [answered[j % n][j // n] for j in range(len(images))]  # chunk i holds images i, i + n, i + 2n, ...


def build_params(engine: SearchEngine, defaults: SearchDefaults, query: SearchQuery) -> SearchParams:
    """A request's query parameters over the deployment's defaults and the build's (also `vps search --index`)."""
    return resolve_params(
        engine.manifest,
        defaults,
        k=query.k,
        category=query.category,
        min_score=query.min_score,
        probe_mass=query.probe_mass,
        max_probes=query.max_probes,
        explain=query.explain,
        filter=query.filter,
        offset=query.offset,
        region=Region.parse(query.bbox, query.bbox_units) if query.bbox else None,
    )


def _report_warnings(state: AppState, request: Request, warnings: Collected) -> None:
    """One JSON line per request at most, with the count and the first few messages (bounded in bytes)."""
    if warnings.count:
        state.metrics.library_warnings.inc(warnings.count)
        log.warning(
            "library warnings while decoding",
            extra={
                "request_id": getattr(request.state, "request_id", None),
                "count": warnings.count,
                "first": warnings.messages,
            },
        )


def _observe(state: AppState, outcome: SearchOutcome) -> None:
    m = state.metrics
    for stage in STAGES:
        if stage in outcome.timings_s:
            m.observe_stage(stage, outcome.timings_s[stage])
    m.shards_probed.observe(len(outcome.probes) + len(outcome.added))
    if not outcome.forced_category:
        m.router_top_probability.observe(outcome.top_probability)
    if outcome.top_score is not None:
        m.top_score.observe(outcome.top_score)  # before the open-set threshold: drift shows in refused answers too
    if not outcome.match:
        m.no_match.inc()


def response_of(engine: SearchEngine, outcome: SearchOutcome, total_s: float, *, images: bool) -> dict[str, Any]:
    """The body of a search answer: plain JSON data in SearchResponse's shape, built from typed values. It is not
    validated against the model on each request: built, validated and serialised it took 125 us of the event
    loop's CPU on the demo index (43 shards probed, 10 results), built and serialised 70 us (one scratch timeit
    run); the tests check that it validates as SearchResponse and serialises as the model would
    (tests/unit/test_response.py)."""
    card = engine.embedder.card
    names = engine.categories
    version = engine.manifest.version

    def item(hit: Hit) -> dict[str, Any]:
        hit_item = hit.item
        image = hit_item.get("image")
        return {
            "sku": str(hit_item["sku"]),
            "score": round(hit.score, 6),
            "category": str(hit_item["category"]),
            "title": hit_item.get("title"),
            "image": image,
            "image_url": hit_item.get("image_url")
            or (f"/v1/catalogue-images/{version}/{hit.row}" if images and image else None),
            "attributes": hit_item.get("attributes") or {},
        }

    ms = {stage: round(outcome.timings_s.get(stage, 0.0) * 1000, 3) for stage in STAGES}
    return {
        "match": outcome.match,
        "results": [item(h) for h in outcome.results],
        "routing": {
            "probed": [{"category": names[p.category], "probability": round(p.probability, 6)} for p in outcome.probes],
            "added": [{"category": names[p.category], "probability": round(p.probability, 6)} for p in outcome.added],
            "forced": outcome.forced_category,
            "live": outcome.live,
        },
        "model": {"name": card.name, "version": card.version, "sha256": card.sha256, "dim": card.output.dim},
        "index_version": version,
        "timings_ms": {**ms, "total": round(total_s * 1000, 3)},
        "hits": [
            {"sku": str(h.item["sku"]), "score": round(h.score, 6), "image": h.item.get("image")}
            for h in outcome.image_hits
        ]
        if outcome.image_hits
        else None,
    }


@router.get("/healthz", response_model=Health, response_model_exclude_none=True)
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz", response_model=Health, response_model_exclude_none=True, responses={503: {"model": ErrorResponse}}
)
async def readyz(state: Annotated[AppState, Depends(get_state)]) -> Health:
    if state.draining:
        raise NotReady("the service is shutting down")
    engine = state.require_engine()
    if engine.pending is not None and engine.pending.failure is not None:
        raise NotReady("an index shard failed verification (logged); this replica cannot answer every search")
    # Ready to search whatever the catalogue database does: a search never needs it. Degraded writes are said.
    if state.catalogue is not None and not state.catalogue.status.ok:
        return Health(status="ready", detail=f"catalogue: {state.catalogue.status.reason}; writes may be refused")
    return Health(status="ready")


@router.get("/v1/info", response_model=Info, responses={503: {"model": ErrorResponse}})
async def info(
    state: Annotated[AppState, Depends(get_state)], engine: Annotated[SearchEngine, Depends(get_engine)]
) -> Info:
    s = state.settings
    return Info(
        model=engine.embedder.card.model_dump(),
        index=engine.manifest.summary(),
        categories=engine.categories,
        limits={
            "max_upload_bytes": s.max_upload_bytes,
            "max_image_pixels": s.max_image_pixels,
            "max_k": 100,
            "default_k": s.default_k,
            "formats": ["jpeg", "png", "webp", "heic", "heif", "avif", "gif"],
        },
        filter_keys={"category": "string", **{k: c.kind for k, c in sorted(engine.attributes.columns.items())}},
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(state: Annotated[AppState, Depends(get_state)]) -> Response:
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
