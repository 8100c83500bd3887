"""The `vps mine` and `vps label import` jobs: the pool of unlabelled photos in, a queue and a contact sheet out;
the labelled queue back in as catalogue images, calibration queries or training pairs."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from app.engine.search import SearchEngine
from app.errors import CatalogueError
from app.offline.datasets.catalogue import read_catalogue, write_catalogue
from app.offline.datasets.images import PhotoProblem, read_photo
from app.offline.mining.mine import MineResult, mine, queue_rows, write_queue
from app.offline.mining.sheet import contact_sheet

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif", ".gif"})
QUEUE_FILE, SHEET_FILE = "queue.csv", "contact_sheet.html"
ImportAs = Literal["catalogue", "calibration", "pairs"]
PAIR_COLUMNS = ["anchor", "sku", "negative_sku"]


def read_pool(queries: Path, images_root: Path | None) -> tuple[list[tuple[str, bytes]], list[str]]:
    """The photos of a directory (recursively, by suffix) or of a CSV's `image` column (under `images_root`,
    default the CSV's directory), named relative to that root; and the names that could not be read."""
    if queries.is_dir():
        root = queries
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    else:
        root = images_root or queries.parent
        names = [r.image for r in read_catalogue(queries)[0]] if _has_sku(queries) else _image_rows(queries)
    if not names:
        raise CatalogueError(f"{queries}: no photos (directory: by suffix {sorted(PHOTO_SUFFIXES)}; CSV: `image`)")
    photos: list[tuple[str, bytes]] = []
    unreadable: list[str] = []
    for name in names:
        try:
            photos.append((name, read_photo(root, name)))
        except PhotoProblem:
            unreadable.append(name)
    return photos, unreadable


def _has_sku(path: Path) -> bool:
    with path.open(newline="", encoding="utf-8") as fh:
        return "sku" in (csv.DictReader(fh).fieldnames or [])


def _image_rows(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if "image" not in (reader.fieldnames or []):
            raise CatalogueError(f"{path}: no `image` column")
        return [r["image"] for r in reader if r.get("image")]


@dataclass(frozen=True)
class MineOutput:
    result: MineResult
    queue: Path
    sheet: Path
    unreadable: list[str]


def run_mine(
    engine: SearchEngine,
    queries: Path,
    out: Path,
    budget: int,
    *,
    images_root: Path | None = None,
    catalogue_root: Path | None = None,
    show_progress: bool = False,
) -> MineOutput:
    photos, unreadable = read_pool(queries, images_root)
    result = mine(engine, photos, budget, show_progress=show_progress)
    out.mkdir(parents=True, exist_ok=True)
    rows = queue_rows(result.queue, engine)
    write_queue(rows, out / QUEUE_FILE)
    by_name = dict(photos)
    (out / SHEET_FILE).write_text(contact_sheet(result.queue, rows, by_name, catalogue_root), encoding="utf-8")
    return MineOutput(result, out / QUEUE_FILE, out / SHEET_FILE, unreadable)


def import_labels(queue: Path, as_: ImportAs, into: Path, categories: dict[str, str]) -> int:
    """The queue's labelled rows (a `sku` filled in; `skip` or empty: left out) appended to `into`: catalogue or
    calibration rows (sku, category, image; the category is the SKU's in the live index, or the row's `category`
    column for a new SKU), or training pairs (the photo, its SKU, and the SKU the index confused it with).
    Refuses the whole file (CatalogueError) on a row it cannot use; returns the rows written."""
    with queue.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"photo", "sku"} - set(reader.fieldnames or [])
        if missing:
            raise CatalogueError(f"{queue}: no {', '.join(sorted(missing))} column (a queue.csv from vps mine)")
        labelled = [(n, r) for n, r in enumerate(reader, start=2) if r.get("sku", "").strip() not in ("", "skip")]
    out_rows: list[dict[str, str]] = []
    for line, r in labelled:
        sku = r["sku"].strip()
        if not r.get("photo"):
            raise CatalogueError(f"{queue}:{line}: no photo")
        if as_ == "pairs":
            negative = (r.get("suggested_sku") or "").strip()
            if negative == sku:
                negative = (r.get("second_sku") or "").strip()
            if negative and negative != sku:
                out_rows.append({"anchor": r["photo"], "sku": sku, "negative_sku": negative})
            continue
        category = categories.get(sku) or (r.get("category") or "").strip()
        if not category:
            raise CatalogueError(
                f"{queue}:{line}: SKU {sku!r} is not in the index: add a `category` column for new SKUs"
            )
        out_rows.append({"sku": sku, "category": category, "image": r["photo"]})
    if as_ == "pairs":
        _append(into, PAIR_COLUMNS, out_rows)
    else:
        existing: list[dict[str, str]] = []
        if into.exists():
            with into.open(newline="", encoding="utf-8") as fh:
                existing = list(csv.DictReader(fh))
        write_catalogue(into, existing + out_rows)
        read_catalogue(into)  # validated as any catalogue CSV: raises naming the file and line
    return len(out_rows)


def _append(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
