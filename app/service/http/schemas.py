"""Response schemas: the JSON contract of DESIGN.md, also published in the OpenAPI document."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from app.engine.search import MAX_OFFSET


class ErrorBody(BaseModel):
    code: str = Field(examples=["corrupt_image"])
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class SearchQuery(BaseModel):
    """POST /search's query parameters, validated as one model in one pydantic-core call by the route itself
    (`app/service/http/routes.py: search_query`), which also lists them in the OpenAPI document."""

    k: int | None = Field(None, ge=1, le=100, description="Number of SKUs")
    category: str | None = Field(None, min_length=1, max_length=200, description="Force a category")
    min_score: float | None = Field(
        None, ge=-1.0, le=1.0, allow_inf_nan=False, description="Score floor; replaces the open-set thresholds"
    )
    probe_mass: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False, description="Router mass to probe")
    max_probes: int | None = Field(None, ge=1, le=1000, description="Most shards searched")
    explain: bool = Field(False, description="Also return the image-level hits before grouping")
    filter: str | None = Field(
        None,
        min_length=1,
        max_length=2048,
        description="Attribute filter, applied before grouping by SKU and before filling to k: `key=value`, "
        "`key<number` (also <=, >, >= on number columns), OR within one key in parentheses, AND across keys; "
        'values with spaces in "double quotes". Keys: `category` and the attribute columns of the index '
        "(GET /v1/info). Example: `brand=Arla AND (pack=1l OR pack=1.5l) AND price<20`. Errors: 422 "
        "`invalid_filter` or `unknown_filter_key`, naming the character position",
    )
    offset: int = Field(
        0, ge=0, le=MAX_OFFSET, description="Paging: results offset .. offset+k-1 of a ranking offset+k deep (0-based)"
    )
    bbox: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="Region of the photo to search, `x1,y1,x2,y2` (x2, y2 exclusive), in the photo's pixels as "
        "sent after its EXIF orientation (what a viewer shows), or fractions 0..1 with bbox_units=fraction. "
        "Error: 422 `invalid_bbox`",
    )
    bbox_units: Literal["px", "fraction"] = Field("px", description="Units of bbox")


class ResultItem(BaseModel):
    sku: str
    score: float
    category: str
    title: str | None = None
    image: str | None = None
    image_url: str | None = Field(
        None,
        description="Catalogue image: for products changed through /v1/products always, for the built index when the "
        "service is configured to serve its images",
    )
    attributes: dict[str, Any] = Field(default_factory=dict)


class ProbedCategory(BaseModel):
    category: str
    probability: float


class Routing(BaseModel):
    probed: list[ProbedCategory] = Field(description="The shards the router chose (or the forced category)")
    added: list[ProbedCategory] = Field(
        default_factory=list,
        description="Shards searched next, in probability order, because the chosen ones held fewer than k SKUs",
    )
    forced: bool = Field(description="True when the caller named the category")
    live: list[str] = Field(
        default_factory=list,
        description="Categories that only live catalogue changes hold (added through /v1/products since the index "
        "version was built): searched whole on every query until compaction",
    )


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
    dim: int


class Timings(BaseModel):
    decode: float
    embed: float
    route: float
    search: float
    group: float
    total: float


class ImageHit(BaseModel):
    sku: str
    score: float
    image: str | None = None


class SearchResponse(BaseModel):
    match: bool = Field(description="False when no catalogue item scores above the open-set threshold")
    results: list[ResultItem]
    routing: Routing
    model: ModelInfo
    index_version: str
    timings_ms: Timings
    hits: list[ImageHit] | None = Field(None, description="Image-level hits before grouping (explain=true)")


class BatchEntry(BaseModel):
    index: int = Field(description="The image's position among the request's `image` parts (0-based)")
    response: SearchResponse | None = Field(None, description="The image's search, as POST /search answers it")
    error: ErrorBody | None = Field(None, description="Why this image was not searched (the others were)")


class BatchResponse(BaseModel):
    results: list[BatchEntry] = Field(description="One entry per image, in the order sent")
    index_version: str
    timings_ms: dict[str, float] = Field(description="total: the whole batch, from its first byte read")


class Health(BaseModel):
    status: str
    detail: str | None = Field(None, description="What is degraded while the service still serves searches")


class Info(BaseModel):
    model: dict[str, Any]
    index: dict[str, Any]
    categories: list[str]
    limits: dict[str, Any]
    filter_keys: dict[str, Literal["string", "number"]] = Field(
        default_factory=dict, description="What `filter` can name: category and the index's attribute columns"
    )


class ReloadResponse(BaseModel):
    result: str = Field(examples=["success"], description="success, or unchanged when CURRENT names the live version")
    previous_version: str | None
    version: str | None
    load_s: float
    pid: int = Field(description="The worker process that reloaded (each worker holds its own engine)")
