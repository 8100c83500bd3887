"""Adapter for the GroceryStoreDataset layout (classes.csv, train.txt, val.txt): catalogue rows for a split."""

from __future__ import annotations

import csv
from pathlib import Path


def read_classes(root: Path) -> dict[int, dict[str, str]]:
    """fine class id -> {sku, category, iconic}."""
    out: dict[int, dict[str, str]] = {}
    with (root / "classes.csv").open(newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        for rec in reader:
            name, fine, coarse, iconic = rec[0], int(rec[1]), rec[2], rec[4]
            out[fine] = {"sku": name, "category": coarse, "iconic": iconic.lstrip("/")}
    return out


def split_rows(root: Path, split: str) -> list[dict[str, str]]:
    """Catalogue rows (sku, category, image, title, source) for `train`, `val` or `iconic`."""
    classes = read_classes(root)
    if split == "iconic":
        return [_row(c, c["iconic"], "studio") for _, c in sorted(classes.items())]
    rows = []
    for line in (root / f"{split}.txt").read_text().splitlines():
        if not line.strip():
            continue
        path, fine, _coarse = (x.strip() for x in line.split(","))
        rows.append(_row(classes[int(fine)], path, "shelf"))
    return rows


def _row(cls: dict[str, str], image: str, source: str) -> dict[str, str]:
    return {
        "sku": cls["sku"],
        "category": cls["category"],
        "image": image,
        "title": cls["sku"].replace("-", " "),
        "source": source,
    }
