"""Catalogue and training photos read from disk for offline jobs (build, training, quantisation): one way to read,
decode and preprocess them, with the same decoder as queries (app/engine/imaging.py) and looser caps, since the
files are the operator's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from app.engine.embedding import ModelInput, decode_side, preprocess
from app.engine.imaging import decode_image

MAX_OFFLINE_IMAGE_BYTES = 50 * 1024 * 1024
MAX_OFFLINE_PIXELS = 100_000_000
MAX_OFFLINE_DECODE_BYTES = 1024 * 1024 * 1024  # a catalogue photo is trusted with more memory than a query


class PhotoProblem(Exception):
    """A photo that cannot be used; `reason` is what the build report says, the message names the photo too."""

    def __init__(self, image: str, reason: str) -> None:
        super().__init__(f"{image}: {reason}")
        self.image, self.reason = image, reason


def read_photo(root: Path, image: str) -> bytes:
    """The bytes of `image` under `root` (resolved: a path may not escape the root), within the byte cap."""
    base = root.resolve()
    path = (base / image).resolve()
    if not path.is_relative_to(base):
        raise PhotoProblem(image, "path escapes the images root")
    try:
        if path.stat().st_size > MAX_OFFLINE_IMAGE_BYTES:
            raise PhotoProblem(image, "file too large")
        return path.read_bytes()
    except OSError:
        raise PhotoProblem(image, "file missing or unreadable") from None


def decode_photo(data: bytes, min_side: int | None = None) -> Image.Image:
    """RGB, EXIF-oriented, first frame (app/engine/imaging.py raises its ServiceError on bad bytes)."""
    return decode_image(
        data, max_pixels=MAX_OFFLINE_PIXELS, min_side=min_side, max_decode_bytes=MAX_OFFLINE_DECODE_BYTES
    )


def model_input(data: bytes, spec: ModelInput) -> np.ndarray:
    """Decoded and preprocessed as the model card prescribes, exactly as a query would be."""
    return preprocess(decode_photo(data, decode_side(spec)), spec)
