"""Read an image from a request without trusting it: a byte cap enforced while streaming, multipart parsed in
memory (no temporary files to leak when a client disconnects), and limits on parts and fields."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from app.errors import ClientClosedRequest, EmptyBody, ImageTooLarge, InvalidMultipart, MissingImage

# Room for multipart boundaries and part headers on top of the image cap.
MULTIPART_OVERHEAD = 64 * 1024
IMAGE_FIELD = "image"


class _InMemoryMultiPartParser(MultiPartParser):
    # The whole body is already capped, so keeping the file part in memory is bounded and leaves no files.
    spool_max_size = 1 << 40


async def read_image(request: Request, max_bytes: int) -> bytes:
    content_type = request.headers.get("content-type", "").lower()
    is_multipart = content_type.startswith("multipart/form-data")
    limit = max_bytes + MULTIPART_OVERHEAD if is_multipart else max_bytes

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge()  # refuse before reading a byte

    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk[: limit + 1 - len(body)]  # never hold more than cap + 1 bytes
            if len(body) > limit:
                raise ImageTooLarge()  # and stop reading at the first chunk past the cap
    except ClientDisconnect:
        raise ClientClosedRequest() from None

    if not is_multipart:
        if not body:
            raise EmptyBody()
        return bytes(body)
    return await _image_from_multipart(request, bytes(body), max_bytes)


async def _image_from_multipart(request: Request, body: bytes, max_bytes: int) -> bytes:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    parser = _InMemoryMultiPartParser(request.headers, stream(), max_files=4, max_fields=16, max_part_size=64 * 1024)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise InvalidMultipart() from exc
    try:
        part = form.get(IMAGE_FIELD)
        if part is None:
            raise MissingImage()
        if not isinstance(part, UploadFile):
            data = part.encode()
        else:
            data = await part.read()
        if len(data) > max_bytes:
            raise ImageTooLarge()
        if not data:
            raise EmptyBody()
        return data
    finally:
        await form.close()
