"""Response schemas: the JSON contract of DESIGN.md, also published in the OpenAPI document."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(examples=["corrupt_image"])
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ResultItem(BaseModel):
    sku: str
    score: float
    category: str
    title: str | None = None
    image: str | None = None
    image_url: str | None = Field(None, description="Catalogue image, when the service is configured to serve them")
    attributes: dict[str, Any] = Field(default_factory=dict)


class ProbedCategory(BaseModel):
    category: str
    probability: float


class Routing(BaseModel):
    probed: list[ProbedCategory]
    forced: bool = Field(description="True when the caller named the category")


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


class Health(BaseModel):
    status: str


class Info(BaseModel):
    model: dict[str, Any]
    index: dict[str, Any]
    categories: list[str]
    limits: dict[str, Any]


class ReloadResponse(BaseModel):
    result: str = Field(examples=["success"], description="success, or unchanged when CURRENT names the live version")
    previous_version: str | None
    version: str | None
    load_s: float
    pid: int = Field(description="The worker process that reloaded (each worker holds its own engine)")
