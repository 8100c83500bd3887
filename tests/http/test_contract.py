"""Contract tests: schemathesis generates requests from the app's own OpenAPI document and sends them over real
HTTP to a running app with a real index. No 5xx; every response matches its documented status, content type,
headers and schema. Examples per operation: VPS_CONTRACT_EXAMPLES (default 60; CI uses the default)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import live_server

EXAMPLES = int(os.environ.get("VPS_CONTRACT_EXAMPLES", "60"))
TOKEN = "contract-token"  # noqa: S105 - test credential
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_api_honours_its_openapi_contract(faiss_index: Path, tiny_model: Path) -> None:
    app_settings = Settings(
        index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0, admin_token=TOKEN, max_inflight=64
    )
    with live_server(create_app(app_settings)) as base:
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "POST /search", "GET /healthz", "GET /readyz", "GET /v1/info", "POST /admin/reload"
        }  # fmt: skip
        calls: dict[str, int] = {}
        for operation in operations:
            _examples(operation, base, calls)()
        assert calls["POST /search"] >= min(EXAMPLES, 20), calls


def _examples(operation: Any, base: str, calls: dict[str, int]) -> Any:
    name = f"{operation.method.upper()} {operation.path}"

    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    def check(case: Any) -> None:
        case.call_and_validate(base_url=base, checks=CHECKS)
        calls[name] = calls.get(name, 0) + 1

    return check
