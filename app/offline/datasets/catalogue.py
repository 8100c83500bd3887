"""Catalogue CSV: `sku,category,image` (image relative to an images root), optional `title`, and any other
columns kept as string attributes. The same format feeds the index build and (later) training."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

REQUIRED = ("sku", "image")
COLUMNS = ("sku", "category", "image")


@dataclass(frozen=True)
class CatalogueRow:
    line: int
    sku: str
    category: str  # "" when the catalogue has no category column: the build clusters instead
    image: str
    title: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # of the image's bytes, once the build has read them


@dataclass(frozen=True)
class RowProblem:
    line: int
    image: str
    reason: str


def read_catalogue(path: Path) -> tuple[list[CatalogueRow], list[RowProblem]]:
    rows: list[CatalogueRow] = []
    problems: list[RowProblem] = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected sku,[category,]image[,title,...]")
        has_category = "category" in header
        reader.fieldnames = header
        for line, raw in enumerate(reader, start=2):
            rec = {k: (v or "").strip() for k, v in raw.items() if k is not None}
            needed = COLUMNS if has_category else REQUIRED
            if not all(rec.get(c) for c in needed):
                problems.append(RowProblem(line, rec.get("image", ""), "missing sku, category or image"))
                continue
            if not is_relative_inside(rec["image"]):
                # The build reads images_root / image, and the web page serves it: never a path outside the root.
                problems.append(RowProblem(line, rec["image"], "image path must be relative, inside the images root"))
                continue
            attributes = {k: v for k, v in rec.items() if k not in (*COLUMNS, "title") and v}
            rows.append(
                CatalogueRow(
                    line, rec["sku"], rec.get("category", ""), rec["image"], rec.get("title") or None, attributes
                )
            )
    return rows, problems


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
