"""Catalogue CSV: `sku,category,image` (image relative to an images root), optional `title`, and any other
columns kept as string attributes. The same format feeds the index build and (later) training."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import CatalogueError

REQUIRED = ("sku", "image")
COLUMNS = ("sku", "category", "image")


@dataclass(frozen=True)
class CatalogueRow:
    line: int
    sku: str
    category: str  # "" when the catalogue has no category column: the build clusters instead
    image: str
    title: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)  # strings from a CSV; numbers too from the API
    sha256: str = ""  # of the image's bytes, once the build has read them
    image_url: str | None = None  # where the service serves it, when not from the images root (catalogue database)


@dataclass(frozen=True)
class RowProblem:
    line: int
    image: str
    reason: str
    sku: str = ""  # "" when the row names none; a SKU all of whose rows have problems is lost to the index


def read_catalogue(path: Path) -> tuple[list[CatalogueRow], list[RowProblem]]:
    """The rows that can be used and the problems of the others. A file that cannot be read as a catalogue (no
    `sku` or `image` column, not UTF-8, broken CSV quoting) raises CatalogueError naming the file and line."""
    rows: list[CatalogueRow] = []
    problems: list[RowProblem] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        try:
            has_category = _check_header(path, reader)
            for raw in reader:
                _parse_row(reader.line_num, raw, has_category, rows, problems)
        except UnicodeDecodeError as exc:
            raise CatalogueError(f"{path}: line {_first_non_utf8_line(path)}: not UTF-8 text") from exc
        except csv.Error as exc:
            raise CatalogueError(f"{path}: line {reader.line_num}: malformed CSV ({exc})") from exc
    return rows, problems


def _first_non_utf8_line(path: Path) -> int:
    # Text is decoded in chunks, so the reader's position at the error is not the line: find it in the bytes.
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return number
    return 1


def _check_header(path: Path, reader: csv.DictReader[str]) -> bool:
    """Normalise the header in place; True when it has a category column."""
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise CatalogueError(
            f"{path}: line 1: missing column(s) {', '.join(missing)} (header: {','.join(header) or 'empty file'}); "
            "expected sku,[category,]image[,title,...]"
        )
    reader.fieldnames = header
    return "category" in header


def _parse_row(
    line: int, raw: dict[str, str], has_category: bool, rows: list[CatalogueRow], problems: list[RowProblem]
) -> None:
    rec = {k: (v or "").strip() for k, v in raw.items() if k is not None}  # key None: values beyond the header
    sku = rec.get("sku", "")
    needed = COLUMNS if has_category else REQUIRED
    if not all(rec.get(c) for c in needed):
        problems.append(RowProblem(line, rec.get("image", ""), "missing sku, category or image", sku))
        return
    if not is_relative_inside(rec["image"]):
        # The build reads images_root / image, and the web page serves it: never a path outside the root.
        problems.append(RowProblem(line, rec["image"], "image path must be relative, inside the images root", sku))
        return
    attributes = {k: v for k, v in rec.items() if k not in (*COLUMNS, "title") and v}
    rows.append(CatalogueRow(line, sku, rec.get("category", ""), rec["image"], rec.get("title") or None, attributes))


def is_relative_inside(image: str) -> bool:
    """A relative POSIX path without `..` components, drive letters or NUL bytes."""
    if not image or "\0" in image or "\\" in image or image.startswith("/") or ":" in image.split("/")[0]:
        return False
    return ".." not in PurePosixPath(image).parts


def write_catalogue(path: Path, rows: list[dict[str, str]]) -> None:
    columns = list(COLUMNS) + sorted({k for r in rows for k in r} - set(COLUMNS))
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
