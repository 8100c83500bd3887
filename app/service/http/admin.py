"""Admin routes, behind a bearer token from settings: 401 without a token, 403 with a wrong one (or when no
token is configured). POST /admin/reload loads the version CURRENT names and swaps it in (app/service/lifecycle.py)."""

from __future__ import annotations

import hmac
import os
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from app.errors import AdminDisabled, Forbidden, NotReady, ReloadRefused, Unauthorized
from app.service.http.routes import get_state
from app.service.http.schemas import ErrorResponse, ReloadResponse
from app.service.state import AppState

admin = APIRouter(prefix="/admin")
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (401, 403, 409, 503)}


async def require_admin(request: Request, state: Annotated[AppState, Depends(get_state)]) -> None:
    token = state.settings.admin_token
    if token is None:
        raise AdminDisabled()
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized()
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise Forbidden()


@admin.post("/reload", response_model=ReloadResponse, responses=_ERRORS, dependencies=[Depends(require_admin)])
async def reload_index(state: Annotated[AppState, Depends(get_state)]) -> ReloadResponse:
    if state.reloader is None or state.draining:
        raise NotReady()
    outcome = await state.reloader.reload()
    if outcome.result == "failed":
        # The reason names a file and the expected and found values: for the operator, behind the token.
        raise ReloadRefused(f"{ReloadRefused.message}: {outcome.reason}")
    return ReloadResponse(
        result=outcome.result,
        previous_version=outcome.previous_version,
        version=outcome.version,
        load_s=round(outcome.load_s, 4),
        pid=os.getpid(),
    )
