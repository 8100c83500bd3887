"""Make examples/grocery/: a small, committed subset of the GroceryStoreDataset for the demo and the docs.

Per SKU: 5 train (shelf) photos spread over its burst, plus its studio ("iconic") image; 12 val photos from
different categories as sample queries; one val photo of each other val SKU as router calibration queries
(calibration.csv: a different session than the catalogue, like real queries, and no SKU of a sample query, so
the sample answers are not flattered); catalogue.csv and queries.csv; the dataset's LICENSE beside them.

    python scripts/make_demo_subset.py --dataset ../shared/datasets/grocery-store --out examples/grocery
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from app.offline.datasets.catalogue import write_catalogue
from app.offline.datasets.grocery import split_rows

PER_SKU = 5
N_QUERIES = 12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("examples/grocery"))
    args = ap.parse_args()
    src: Path = args.dataset
    out: Path = args.out
    images = out / "images"
    if images.exists():
        shutil.rmtree(images)

    by_sku: dict[str, list[dict[str, str]]] = {}
    for row in split_rows(src, "train"):
        by_sku.setdefault(row["sku"], []).append(row)
    catalogue: list[dict[str, str]] = []
    for rows in by_sku.values():
        step = max(1, len(rows) // PER_SKU)
        catalogue.extend(rows[::step][:PER_SKU])
    catalogue.extend(split_rows(src, "iconic"))

    seen_categories: set[str] = set()
    queries: list[dict[str, str]] = []
    for row in split_rows(src, "val"):
        if row["category"] not in seen_categories and len(queries) < N_QUERIES:
            seen_categories.add(row["category"])
            queries.append(row)
    query_skus = {q["sku"] for q in queries}
    calibration: list[dict[str, str]] = []
    for row in split_rows(src, "val"):
        if row["sku"] not in query_skus and row["sku"] not in {c["sku"] for c in calibration}:
            calibration.append(row)

    for rows in (catalogue, calibration, queries):
        for row in rows:
            dest = images / row["image"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / row["image"], dest)
    write_catalogue(out / "catalogue.csv", catalogue)
    write_catalogue(out / "queries.csv", queries)
    write_catalogue(out / "calibration.csv", calibration)
    shutil.copyfile(src / "LICENSE", out / "LICENSE")
    print(f"{len(catalogue)} catalogue images, {len(calibration)} calibration, {len(queries)} queries -> {out}")


if __name__ == "__main__":
    main()
