"""Attribute columns of one index version, for filtered search (app/engine/filters.py).

Written at build time beside the item table, one file per column, every one a plain `.npy` array with a row per
item (the item table's row order) that the service memory-maps: workers share the pages, a million-row column
costs no load time, and a filter reads whole columns with numpy instead of parsing item rows.

- a `number` column (every value the build saw is a finite number, or a string that parses as one): float64,
  NaN where the item has no value;
- a `string` column: int32 codes into the sorted distinct values (in `attributes/columns.json`), -1 where the
  item has no value. Numbers from the API in a mostly-string column are kept as their decimal text.

No pickle anywhere; the manifest lists and verifies every file like the shards'.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.artifacts.manifest import safe_join
from app.errors import ArtifactError

COLUMNS_FILE = "attributes/columns.json"
SKU_KEY = "sku"  # the build's SKU column: always a string column (identifiers, even when all digits)
Kind = Literal["number", "string"]
MAX_COLUMNS = 256  # attribute keys indexed per version; a catalogue with more keeps the rest unfilterable
MAX_STRING_VALUES = 1_000_000  # distinct values of one string column (codes stay int32, the values file small)


# A string the build may read as a number: plain decimal, no leading zero (an EAN "0400..." or SKU "000123" is an
# identifier), at most 15 significant digits (what float64 holds exactly).
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?")


def as_number(value: Any) -> float | None:
    """A finite number, from a JSON number or from a string that is one exactly ("19.90", "2"); None otherwise
    (booleans, "1e3", "000123", 20-digit identifiers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        f = float(value)
        return f if math.isfinite(f) and (not isinstance(value, int) or abs(value) < 10**15) else None
    if isinstance(value, str):
        text = value.strip()
        if not _NUMBER.fullmatch(text) or len(text.replace("-", "").replace(".", "").lstrip("0")) > 15:
            return None
        return float(text)
    return None


def as_text(value: Any) -> str:
    """A value's text for string columns and equality: numbers without a trailing `.0` (JSON's 2 and 2.0),
    booleans as JSON writes them (true, false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Column:
    key: str
    kind: Kind
    data: np.ndarray  # float64 (number) or int32 codes (string), one per row
    values: tuple[str, ...] = ()  # string columns: code -> value, sorted

    def code(self, value: str) -> int:
        """The code of `value` in a string column; -1 when no row holds it."""
        i = bisect.bisect_left(self.values, value)
        return i if i < len(self.values) and self.values[i] == value else -1


class AttributeIndex:
    """The columns of one version, by key (memory-mapped)."""

    def __init__(self, columns: dict[str, Column], n_rows: int) -> None:
        self.columns = columns
        self.n_rows = n_rows

    @classmethod
    def empty(cls, n_rows: int) -> AttributeIndex:
        return cls({}, n_rows)

    @staticmethod
    def write(attributes: Sequence[dict[str, Any]], version_dir: Path, skus: Sequence[str] | None = None) -> str:
        """One column per attribute key (the most common keys first, at most MAX_COLUMNS), and with `skus` a
        `sku` string column (filters name it; the engine finds a changed SKU's rows with it); returns the
        columns file's path relative to the version."""
        if skus is not None:
            attributes = [{**a, "sku": s} for a, s in zip(attributes, skus, strict=True)]
        counts: dict[str, int] = {}
        for attrs in attributes:
            for key, value in attrs.items():
                # `category` is the item's own (filters read it from the shards): an attribute of that name
                # would be unreachable.
                if value is not None and value != "" and key != "category":
                    counts[key] = counts.get(key, 0) + 1
        keys = sorted(counts, key=lambda k: (-counts[k], k))[:MAX_COLUMNS]
        out = version_dir / "attributes"
        out.mkdir(parents=True, exist_ok=True)
        meta: dict[str, dict[str, Any]] = {}
        for i, key in enumerate(sorted(keys)):
            column = [attrs.get(key) for attrs in attributes]
            present = [v for v in column if v is not None and v != ""]
            rel = f"attributes/{i:04d}.npy"
            if key != SKU_KEY and present and all(as_number(v) is not None for v in present):
                data = np.asarray([np.nan if (n := as_number(v)) is None else n for v in column], dtype=np.float64)
                meta[key] = {"kind": "number", "file": rel}
            else:
                texts = [None if v is None or v == "" else as_text(v) for v in column]
                values = sorted({t for t in texts if t is not None})
                if len(values) > MAX_STRING_VALUES:
                    continue
                code = {v: j for j, v in enumerate(values)}
                data = np.asarray([-1 if t is None else code[t] for t in texts], dtype=np.int32)
                meta[key] = {"kind": "string", "file": rel, "values": values}
            np.save(version_dir / rel, data, allow_pickle=False)
        (version_dir / COLUMNS_FILE).write_text(
            json.dumps({"n_rows": len(attributes), "columns": meta}, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return COLUMNS_FILE

    @classmethod
    def load(cls, version_dir: Path, rel: str | None, n_rows: int, listed: Collection[str]) -> AttributeIndex:
        """A version's columns; a version built before attribute indexes had none (only `category` filters).
        Every column file must be one the manifest lists (and so verified)."""
        if rel is None:
            return cls.empty(n_rows)
        path = safe_join(version_dir, rel)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            meta: dict[str, dict[str, Any]] = doc["columns"]
            if not all(isinstance(m, dict) for m in meta.values()):
                raise TypeError("a column entry is not an object")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"attribute columns {path}: unreadable") from exc
        if doc.get("n_rows") != n_rows:
            raise ArtifactError(f"attribute columns {path}: rows expected {n_rows} (manifest), got {doc.get('n_rows')}")
        columns: dict[str, Column] = {}
        for key, m in meta.items():
            if str(m.get("file")) not in listed:
                raise ArtifactError(f"attribute columns {path}: {m.get('file')} is not listed in the manifest")
            file = safe_join(version_dir, str(m["file"]))
            data = np.load(file, mmap_mode="r", allow_pickle=False)
            kind = m.get("kind")
            want = np.float64 if kind == "number" else np.int32
            if kind not in ("number", "string") or data.dtype != want or data.shape != (n_rows,):
                raise ArtifactError(f"attribute column {file}: expected {n_rows} {np.dtype(want)} values")
            values = tuple(str(v) for v in m.get("values", ()))
            columns[key] = Column(key, kind, data, values)
        return cls(columns, n_rows)
