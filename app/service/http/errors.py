"""Where errors become HTTP: ServiceError -> its status and stable code; request validation -> 422
`invalid_parameter`; anything unexpected -> 500 `internal_error` (logged with the request id, text not leaked).
The app's exception handlers and the plain ASGI routes (`plain_route`) share these functions."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from app.errors import NotReady, Overloaded, ServiceError
from app.service.metrics import Metrics

log = logging.getLogger(__name__)


def request_id_of(request: Request) -> str | None:
    rid = getattr(request.state, "request_id", None)
    return rid if isinstance(rid, str) else None


# Liveness, readiness and scrapes: never refused by the request cap (app/service/server.py), answered for any Host
# (app/service/app.py), since probes send the pod IP and build nothing from it.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def error_payload(code: str, message: str, request_id: str | None) -> dict[str, dict[str, str | None]]:
    """The one JSON error shape, for the app's handlers and the protocol's own refusals."""
    return {"error": {"code": code, "message": message, "request_id": request_id}}


def error_response(
    status: int, code: str, message: str, request_id: str | None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_payload(code, message, request_id), status_code=status, headers=headers)


def service_error_response(
    exc: ServiceError, request_id: str | None, retry_after_s: int, metrics: Metrics
) -> JSONResponse:
    """A ServiceError as its status and stable code (Retry-After on 503s, counted refusals, 5xx logged)."""
    headers = {"Retry-After": str(retry_after_s)} if exc.status == 503 else None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, Overloaded | NotReady):
        metrics.rejected.labels(reason=exc.code).inc()
    if exc.status >= 500 and not isinstance(exc, Overloaded):
        log.error("request failed", extra={"request_id": request_id, "code": exc.code})
    return error_response(exc.status, exc.code, exc.message, request_id, headers)


def validation_error_response(exc: RequestValidationError, request_id: str | None) -> JSONResponse:
    """Request validation as 422 `invalid_parameter`, naming the first few fields and what is wrong with them."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    message = "; ".join(parts) or "invalid request"
    return error_response(422, "invalid_parameter", message, request_id)


def http_error_response(exc: StarletteHTTPException, request_id: str | None) -> JSONResponse:
    """Starlette's HTTP exceptions (no route, wrong method) in the same shape, with their headers (Allow)."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, "request refused")
    return error_response(exc.status_code, code, message, request_id, dict(exc.headers or {}))


def install_error_handlers(app: FastAPI, retry_after_s: int, metrics: Metrics) -> None:
    async def on_service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)  # noqa: S101 - registered for ServiceError only
        return service_error_response(exc, request_id_of(request), retry_after_s, metrics)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        return validation_error_response(exc, request_id_of(request))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        return http_error_response(exc, request_id_of(request))

    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


def plain_route(
    handler: Callable[[Request], Awaitable[Response]], route: BaseRoute, retry_after_s: int, metrics: Metrics
) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A route handler (Request -> Response) as a plain ASGI app with the same error mapping as the app's
    handlers above: what `ServiceApp` serves ahead of Starlette's middleware stack and FastAPI's router. The
    route goes in the scope here, as FastAPI's router puts it, so a request refused before it (the Host check)
    is labelled as unmatched, as on FastAPI's path; anything else unexpected is ObserveMiddleware's JSON 500."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = route
        request = Request(scope, receive)
        response: Response
        try:
            response = await handler(request)
        except ServiceError as exc:
            response = service_error_response(exc, request_id_of(request), retry_after_s, metrics)
        except RequestValidationError as exc:
            response = validation_error_response(exc, request_id_of(request))
        except StarletteHTTPException as exc:
            response = http_error_response(exc, request_id_of(request))
        await response(scope, receive, send)

    return asgi
