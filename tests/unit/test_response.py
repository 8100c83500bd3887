"""POST /search's body is built as plain data and serialised without validating it against SearchResponse on each
request (app/service/http/routes.py, response_of): these tests hold it to the model instead, on real searches."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic_core import to_json

from app.engine.search import resolve_params
from app.service.config import Settings
from app.service.engines import load_engine
from app.service.http.routes import response_of
from app.service.http.schemas import SearchResponse
from tests.helpers import encode, product_image

DEMO_QUERY = Path("examples/grocery/images")


def _assert_is_the_model(body: dict[str, object]) -> None:
    model = SearchResponse.model_validate(body, strict=True)
    # Same keys, order, values and float text, serialised as the route does.
    assert to_json(body, inf_nan_mode="null") == model.model_dump_json().encode()


@pytest.mark.parametrize("explain", [False, True])
def test_a_tiny_index_answer_is_a_search_response(faiss_index: Path, tiny_model: Path, explain: bool) -> None:
    engine = load_engine(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0))
    outcome = engine.search_image(
        encode(product_image("red-apple", 0)), resolve_params(engine.manifest, k=3, explain=explain)
    )
    body = response_of(engine, outcome, 0.0123, images=True)
    _assert_is_the_model(body)
    assert body["results"] and (body["hits"] is not None) == explain


def test_a_demo_answer_is_a_search_response(demo_index: Path) -> None:
    """The shipped model on the demo catalogue: many shards probed, items with titles and attributes."""
    from app.service.config import SHIPPED_MODEL_DIR

    engine = load_engine(Settings(index_dir=demo_index, model_dir=SHIPPED_MODEL_DIR, warmup_queries=0))
    photo = sorted(DEMO_QUERY.rglob("*.jpg"))[0].read_bytes()
    outcome = engine.search_image(photo, resolve_params(engine.manifest, k=10, explain=True))
    body = response_of(engine, outcome, 0.02, images=False)
    _assert_is_the_model(body)
    assert len(body["results"]) == 10  # type: ignore[arg-type]
