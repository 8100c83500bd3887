"""Catalogue writes through the API (bearer `VPS_ADMIN_TOKEN`, as /admin): products and their images change in
the database (app/catalogue/store.py) and are searchable at once in this process and within `VPS_SYNC_S` in every
other (app/catalogue/follow.py). A 2xx means committed. Images are decoded and embedded with the same decoder,
limits and error codes as queries, before anything is written: one bad image refuses the whole request.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.catalogue.follow import CatalogueFollower
from app.catalogue.store import NewImage, ProductState, sha256_of
from app.engine.delta import catalogue_image_url
from app.engine.imaging import sniff_format
from app.engine.search import SearchEngine
from app.errors import CatalogueUnavailable, ImageNotFound, IndexNotFromCatalogue
from app.service.http.admin import require_admin
from app.service.http.routes import get_state
from app.service.http.schemas import ErrorResponse
from app.service.http.upload import read_images
from app.service.http.web import read_catalogue_file
from app.service.state import AppState

catalogue = APIRouter(prefix="/v1/products", tags=["catalogue"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 503)
}
# SKUs travel in URL paths and in image URLs: a conservative alphabet, no slashes, no whitespace.
SKU = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:~-]{0,199}$", description="Product SKU")]
IMAGE_ID = Annotated[str, Path(pattern=r"^[0-9a-f]{24}$", description="Image id (from the write that added it)")]


def _encodable(text: str) -> str:
    text.encode("utf-8")  # a lone surrogate raises: it could never be written out in a search answer
    return text


MAX_ATTRIBUTES_BYTES = 16 * 1024  # of a product's attributes as JSON: every search answer showing it carries them
AttributeText = Annotated[str, Field(max_length=1000), AfterValidator(_encodable)]
AttributeNumber = Annotated[float, Field(allow_inf_nan=False)]
AttributeInt = Annotated[int, Field(ge=-(2**53), le=2**53)]  # exact in every JSON reader
AttributeValue = bool | AttributeInt | AttributeNumber | AttributeText
AttributeKey = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_.-]*$")]


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    category: str = Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")
    title: str = Field("", max_length=1000, pattern=r"^[^\x00-\x1f\x7f]*$")
    attributes: dict[AttributeKey, AttributeValue] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _attributes_fit(self) -> ProductIn:
        if len(json.dumps(self.attributes)) > MAX_ATTRIBUTES_BYTES:
            raise ValueError(f"attributes take more than {MAX_ATTRIBUTES_BYTES} bytes as JSON")
        return self


class ImageOut(BaseModel):
    image_id: str
    sha256: str
    url: str


class ProductOut(BaseModel):
    sku: str
    category: str
    title: str
    attributes: dict[str, Any]
    images: list[ImageOut]
    seq: int = Field(description="Sequence number of the product's last change")


class WriteOut(BaseModel):
    sku: str
    seq: int = Field(description="Sequence number of this change; later changes have larger ones")
    image_ids: list[str] = Field(default_factory=list)


def get_follower(request: Request) -> CatalogueFollower:
    state: AppState = request.app.state.vps
    if state.catalogue is None:
        raise CatalogueUnavailable()
    return state.catalogue


async def require_catalogue_index(state: Annotated[AppState, Depends(get_state)]) -> None:
    """Writes need a live version built from this database: masking a changed SKU's indexed rows is right only
    when the database holds every product of the version (one built from a CSV alone, or from another database,
    would lose them, or never show the writes)."""
    manifest = state.require_engine().manifest
    if manifest.catalogue_seq is None:
        raise IndexNotFromCatalogue()
    follower = state.catalogue
    if follower is not None:
        ours = await anyio.to_thread.run_sync(follower.store.catalogue_id)
        if manifest.catalogue_id != ours:
            raise IndexNotFromCatalogue(
                "the live index version was built from another catalogue database than VPS_CATALOGUE_URL: "
                "rebuild it from this one (`vps build-index` or `vps compact`) before changing products here"
            )


Follower = Annotated[CatalogueFollower, Depends(get_follower)]
State = Annotated[AppState, Depends(get_state)]
ADMIN = [Depends(require_admin)]
WRITE = [Depends(require_admin), Depends(require_catalogue_index)]


@catalogue.put("/{sku}", response_model=WriteOut, responses=_ERRORS, dependencies=WRITE)
async def put_product(sku: SKU, body: ProductIn, state: State, follower: Follower) -> WriteOut:
    """Create or replace a product's metadata (its images stay)."""
    seq = await anyio.to_thread.run_sync(follower.store.put_product, sku, body.category, body.title, body.attributes)
    await _applied(state, follower, "put_product")
    return WriteOut(sku=sku, seq=seq)


@catalogue.post("/{sku}/images", response_model=WriteOut, status_code=201, responses=_ERRORS, dependencies=WRITE)
async def add_images(sku: SKU, request: Request, state: State, follower: Follower) -> WriteOut:
    """Add one or more images (multipart parts named `image`); answers their ids in order."""
    settings = state.settings
    engine = state.require_engine()
    state.runner.refuse_if_full(settings.max_queued)
    datas = await read_images(request, settings.max_upload_bytes, settings.max_images_per_write)
    async with state.runner.admit(settings.queue_wait_s, settings.max_queued) as ticket:
        new = await state.runner.run(ticket, settings.request_timeout_s * len(datas), _embed_all, engine, datas)
    model = engine.embedder.card.sha256
    seq, ids = await anyio.to_thread.run_sync(follower.store.add_images, sku, new, model)
    await _applied(state, follower, "add_images")
    return WriteOut(sku=sku, seq=seq, image_ids=ids)


@catalogue.delete("/{sku}/images/{image_id}", response_model=WriteOut, responses=_ERRORS, dependencies=WRITE)
async def delete_image(sku: SKU, image_id: IMAGE_ID, state: State, follower: Follower) -> WriteOut:
    seq = await anyio.to_thread.run_sync(follower.store.delete_image, sku, image_id)
    await _applied(state, follower, "delete_image")
    return WriteOut(sku=sku, seq=seq)


@catalogue.delete("/{sku}", response_model=WriteOut, responses=_ERRORS, dependencies=WRITE)
async def delete_product(sku: SKU, state: State, follower: Follower) -> WriteOut:
    seq = await anyio.to_thread.run_sync(follower.store.delete_product, sku)
    await _applied(state, follower, "delete_product")
    return WriteOut(sku=sku, seq=seq)


@catalogue.get("/{sku}", response_model=ProductOut, responses=_ERRORS, dependencies=ADMIN)
async def get_product(sku: SKU, follower: Follower) -> ProductOut:
    p: ProductState = await anyio.to_thread.run_sync(follower.store.get_product, sku)
    images = [
        ImageOut(image_id=i.image_id, sha256=i.sha256, url=catalogue_image_url(sku, i.image_id)) for i in p.images
    ]
    return ProductOut(sku=p.sku, category=p.category, title=p.title, attributes=p.attributes, images=images, seq=p.seq)


@catalogue.get("/{sku}/images/{image_id}", responses={200: {"content": {"image/*": {}}}, **_ERRORS})
async def image(sku: SKU, image_id: IMAGE_ID, state: State, follower: Follower) -> Response:
    """The image's bytes (public, as the search results that link to it): as added through the API, or for an
    imported image, its file under VPS_CATALOGUE_IMAGES_DIR."""
    data, ref = await anyio.to_thread.run_sync(follower.store.image_bytes, sku, image_id)
    if data is not None:
        fmt = sniff_format(data)
        media = f"image/{fmt.lower()}" if fmt else "application/octet-stream"
    elif state.settings.catalogue_images_dir is not None:
        data, media = await anyio.to_thread.run_sync(read_catalogue_file, state.settings.catalogue_images_dir, ref)
    else:
        raise ImageNotFound("the image was imported from files this service is not configured to serve")
    return Response(
        data, media_type=media, headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}
    )


def _embed_all(engine: SearchEngine, datas: list[bytes]) -> list[NewImage]:
    """Decode and embed every image first: any error refuses the request before the database is touched."""
    return [NewImage(sha256_of(d), d, engine.embed_image(d)[0]) for d in datas]


async def _applied(state: AppState, follower: CatalogueFollower, op: str) -> None:
    """The change is committed; apply it to this process's engine before answering (read-your-writes here).
    A failure to read it back is not the write's failure: the follower thread retries."""
    state.metrics.catalogue_changes.labels(op=op).inc()
    engine = state.engine
    if engine is None:
        return
    t0 = time.perf_counter()
    await anyio.to_thread.run_sync(follower.sync_quietly, engine)
    state.metrics.delta_items.set(engine.delta.n_items)
    state.metrics.observe_stage("catalogue_apply", time.perf_counter() - t0)
