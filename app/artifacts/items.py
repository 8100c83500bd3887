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

# Rows kept parsed: grouping reads every hit's row until k SKUs are found (about 30 rows a search at k=10), and
# parsing them was 0.33 ms of CPU a search (scripts/profile_service.py). At most CACHED_ROWS rows a worker: when
# full the cache starts again, so it stays bounded and popular rows return at once.
CACHED_ROWS = 16384


class ItemTable:
    def __init__(self, blob: mmap.mmap | bytes, offsets: np.ndarray, cached_rows: int = CACHED_ROWS) -> None:
        self._blob = blob
        self._offsets = offsets
        self._cached_rows = cached_rows
        self._parsed: dict[int, dict[str, Any]] = {}  # dict reads and writes are atomic: threads share it

    @classmethod
    def load(cls, jsonl_path: Path, offsets_path: Path, cached_rows: int = CACHED_ROWS) -> ItemTable:
        offsets = np.load(offsets_path, mmap_mode="r", allow_pickle=False)
        if offsets.ndim != 1 or offsets.dtype != np.uint64 or len(offsets) < 1:
            raise ArtifactError(f"item offsets {offsets_path}: expected 1-d uint64, got {offsets.dtype}")
        size = jsonl_path.stat().st_size
        if int(offsets[-1]) != size:
            raise ArtifactError(f"item table {jsonl_path}: size expected {int(offsets[-1])}, got {size}")
        if size == 0:
            return cls(b"", offsets, cached_rows)
        with jsonl_path.open("rb") as fh:
            blob = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return cls(blob, offsets, cached_rows)

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
        """Row `row` as a dict of its own (a caller may change it; the nested attributes are shared, read-only)."""
        item = self._parsed.get(row)
        if item is None:
            start, end = int(self._offsets[row]), int(self._offsets[row + 1])
            item = json.loads(self._blob[start:end])
            if self._cached_rows:
                if len(self._parsed) >= self._cached_rows:
                    self._parsed.clear()
                self._parsed[row] = item
        return dict(item)
