"""The service's one error taxonomy. Each error has a stable code and HTTP status; messages are safe to show
(they never carry exception text from a library). The mapping to HTTP lives in `app.service.http.errors`."""

from __future__ import annotations


class ServiceError(Exception):
    code = "internal_error"
    status = 500
    message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        if message:
            self.message = message


class EmptyBody(ServiceError):
    code, status, message = "empty_body", 400, "the request carries no image bytes"


class MissingImage(ServiceError):
    code, status, message = "missing_image", 400, "send the image as multipart field 'image' or as the raw body"


class InvalidMultipart(ServiceError):
    code, status, message = "invalid_multipart", 400, "the multipart body is malformed or has too many parts"


class CorruptImage(ServiceError):
    code, status, message = "corrupt_image", 400, "the image could not be decoded (corrupt or truncated)"


class ImageTooLarge(ServiceError):
    code, status, message = "image_too_large", 413, "the image exceeds the byte limit"


class UnsupportedFormat(ServiceError):
    code, status, message = (
        "unsupported_format",
        415,
        "unsupported image format; send JPEG, PNG, WebP, HEIC/HEIF, AVIF or GIF",
    )


class TooManyPixels(ServiceError):
    code, status, message = "too_many_pixels", 422, "the image has too many pixels"


class ImageTooComplex(ServiceError):
    code, status, message = (
        "image_too_complex",
        422,
        "the image would cost too much to decode (too many JPEG scans or segments, or too much memory for its "
        "size, bit depth and channels); send a plainer or smaller image",
    )


class InvalidParameter(ServiceError):
    code, status, message = "invalid_parameter", 422, "a request parameter is invalid"


class UnknownCategory(ServiceError):
    code, status, message = "unknown_category", 422, "unknown category"


class InvalidRegion(ServiceError):
    code, status, message = (
        "invalid_bbox",
        422,
        "bbox must be x1,y1,x2,y2 with x1 < x2 and y1 < y2 inside the photo (pixels, or fractions 0..1 with "
        "bbox_units=fraction)",
    )


class InvalidFilter(ServiceError):
    code, status, message = "invalid_filter", 422, "the filter expression cannot be parsed"


class UnknownFilterKey(ServiceError):
    code, status, message = "unknown_filter_key", 422, "the filter names a key the index does not hold"


class TooManyImages(ServiceError):
    code, status, message = (
        "too_many_images",
        422,
        "the batch holds more images than VPS_MAX_BATCH_IMAGES (16 by default)",
    )


class Unauthorized(ServiceError):
    code, status, message = "unauthorized", 401, "a bearer token is required"


class Forbidden(ServiceError):
    code, status, message = "forbidden", 403, "the bearer token is not valid"


class AdminDisabled(ServiceError):
    code, status, message = "admin_disabled", 403, "admin routes are disabled: no admin token is configured"


class ReloadRefused(ServiceError):
    code, status, message = "reload_refused", 409, "the new index version was refused; the old one keeps serving"


class ClientClosedRequest(ServiceError):
    # nginx's 499: the client went away before its request was read; nobody receives this answer, but the
    # request is counted and logged as what it was, not as a server error.
    code, status, message = "client_closed_request", 499, "the client closed the connection before sending the image"


class DeadlineExceeded(ServiceError):
    code, status, message = "deadline_exceeded", 503, "the search took longer than the request deadline; retry"


class Overloaded(ServiceError):
    code, status, message = "overloaded", 503, "the service is at capacity; retry shortly"


class ShardUnavailable(ServiceError):
    code, status, message = (
        "shard_unavailable",
        503,
        "an index shard this search needs failed verification; retry on another replica",
    )


class NotReady(ServiceError):
    code, status, message = "not_ready", 503, "the service is not ready"


class ProductNotFound(ServiceError):
    code, status, message = "product_not_found", 404, "no product with this SKU; PUT /v1/products/{sku} creates it"


class ImageNotFound(ServiceError):
    code, status, message = "image_not_found", 404, "the product has no image with this id"


class IndexNotFromCatalogue(ServiceError):
    code, status, message = (
        "index_not_from_catalogue",
        409,
        "the live index version was built without the catalogue database, which therefore does not know its "
        "products: rebuild it with `vps build-index` (it imports the catalogue) before changing products here",
    )


class CatalogueUnavailable(ServiceError):
    code, status, message = (
        "catalogue_unavailable",
        503,
        "the catalogue database cannot be reached; nothing was changed, retry later (searches keep serving)",
    )


class InternalError(ServiceError):
    code, status, message = "internal_error", 500, "internal error"


class ArtifactError(Exception):
    """An artifact (model, index) failed verification at load. Never mapped to a request: start-up fails."""


class CatalogueError(ValueError):
    """Bad input data for an offline job: a catalogue or query CSV that cannot be read (the message names the file
    and line), or a catalogue none of whose images can be embedded. `vps` exits 3."""


class ModelNotFound(ArtifactError):
    """No model directory was given and none was found where the default is looked for. `vps` exits 4, like any
    other model or index artifact problem."""


class BuildRefused(Exception):
    """The build would lose products (every image of a SKU failed, or more images failed than allowed): nothing
    was published and CURRENT is unchanged. `vps` exits 5."""

    def __init__(self, message: str, *, lost_skus: list[str], report: str) -> None:
        super().__init__(message)
        self.lost_skus = lost_skus
        self.report = report


class EngineFailed(Exception):
    """A build engine failed: its cluster cannot be reached, or its workers kept dying past their retries.
    Nothing was published and CURRENT is unchanged. `vps` exits 7."""
