"""Content hashes for artifacts."""

from __future__ import annotations

import hashlib
from io import BufferedReader
from pathlib import Path


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return sha256_stream(fh)


def sha256_stream(fh: BufferedReader) -> str:
    return hashlib.file_digest(fh, "sha256").hexdigest()
