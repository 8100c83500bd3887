"""Item table: vector row -> sku, category, image, title, attributes.

Stored as JSON lines plus a uint64 offsets array; both are memory-mapped, so a million-item table costs no
load time and no per-worker copy, and a request parses only the rows it returns. No pickle anywhere.
"""

from __future__ import annotations

import json
import mmap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import ArtifactError


class ItemTable:
    def __init__(self, blob: mmap.mmap | bytes, offsets: np.ndarray) -> None:
        self._blob = blob
        self._offsets = offsets

    @classmethod
    def load(cls, jsonl_path: Path, offsets_path: Path) -> ItemTable:
        offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
        if offsets.ndim != 1 or offsets.dtype != np.uint64 or len(offsets) < 1:
            raise ArtifactError(f"item offsets {offsets_path}: expected 1-d uint64, got {offsets.dtype}")
        size = jsonl_path.stat().st_size
        if int(offsets[-1]) != size:
            raise ArtifactError(f"item table {jsonl_path}: size expected {int(offsets[-1])}, got {size}")
        if size == 0:
            return cls(b"", offsets)
        with jsonl_path.open("rb") as fh:
            blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return cls(blob, offsets)

    @staticmethod
    def write(rows: Iterable[dict[str, Any]], jsonl_path: Path, offsets_path: Path) -> int:
        offsets = [0]
        with jsonl_path.open("wb") as fh:
            for row in rows:
                line = json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
                fh.write(line)
                offsets.append(offsets[-1] + len(line))
        np.save(offsets_path, np.asarray(offsets, dtype=np.uint64), allow_pickle=False)
        return len(offsets) - 1

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def get(self, row: int) -> dict[str, Any]:
        start, end = int(self._offsets[row]), int(self._offsets[row + 1])
        item: dict[str, Any] = json.loads(self._blob[start:end])
        return item
