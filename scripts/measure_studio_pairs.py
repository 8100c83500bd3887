"""Does training that pairs studio shots with shelf photos help studio shots it never saw? (issue #20, item 4)

    python scripts/measure_studio_pairs.py split --dataset ../shared/datasets/grocery-store --out runs/studio
    vps train ... --studio-pairs runs/studio/studio_seen.csv          # half the SKUs' studio shots
    python scripts/measure_studio_pairs.py measure --dataset ../shared/datasets/grocery-store \
        --split runs/studio --models models/A models/B --out docs/bench

`split` draws half the SKUs (seeded) and writes their studio shots to `studio_seen.csv`, the others' to
`studio_unseen.csv`. `measure` searches the whole studio catalogue (every SKU's shot) with the val photos, exactly,
and reports recall separately for the val photos whose SKU's shot was trained on ("seen") and the rest
("unseen"): studio shots the model never saw, of SKUs whose shelf photos it did see (as for the model trained
without pairs). It is the nearest this dataset comes to a new product's one studio shot, and the only honest
studio figure for a model trained on studio shots. The split is seeded; it is not recorded in the model. The
train-photo catalogue is reported too (all val photos). Writes <out>/studio_pairs.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
from compare_models import embed_rows  # the same decoding and batching as the model comparison

from app.engine.embedding import OnnxEmbedder
from app.offline.datasets.grocery import split_rows
from app.offline.evaluate.metrics import sku_recall

_FIELDS = ["sku", "category", "image", "title", "source"]


def write_split(dataset: Path, out: Path, seed: int) -> None:
    iconic = split_rows(dataset, "iconic")
    skus = sorted({r["sku"] for r in iconic})
    seen = set(np.random.default_rng(seed).permutation(skus)[: len(skus) // 2])
    out.mkdir(parents=True, exist_ok=True)
    for name, keep in (("studio_seen.csv", True), ("studio_unseen.csv", False)):
        with (out / name).open("w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=_FIELDS)
            w.writeheader()
            w.writerows(r for r in iconic if (r["sku"] in seen) == keep)
    print(f"{len(seen)} of {len(skus)} SKUs seen; wrote {out}/studio_seen.csv and studio_unseen.csv")


def _recall(q: np.ndarray, qskus: list[str], c: np.ndarray, cskus: list[str]) -> dict[str, float]:
    r = sku_recall(q, qskus, c, cskus, (1, 5))
    return {"recall@1": round(r[1], 4), "recall@5": round(r[5], 4), "queries": len(qskus)}


def measure_model(model: Path, dataset: Path, seen: set[str]) -> dict[str, Any]:
    embedder = OnnxEmbedder(model, intra_op_threads=2)
    train, val, iconic = (split_rows(dataset, s) for s in ("train", "val", "iconic"))
    q, t, s = (embed_rows(embedder, dataset, rows) for rows in (val, train, iconic))
    qskus, tskus, iskus = ([r["sku"] for r in rows] for rows in (val, train, iconic))
    part = np.asarray([sku in seen for sku in qskus])

    def pick(mask: np.ndarray) -> list[str]:
        return [sku for sku, keep in zip(qskus, mask, strict=True) if keep]

    return {
        "model": model.name,
        "train_catalogue": _recall(q, qskus, t, tskus),
        "studio_catalogue": _recall(q, qskus, s, iskus),
        "studio_seen_skus": _recall(q[part], pick(part), s, iskus),
        "studio_unseen_skus": _recall(q[~part], pick(~part), s, iskus),
    }


def write_report(results: list[dict[str, Any]], out: Path, command: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "studio_pairs.json").write_text(json.dumps({"command": command, "results": results}, indent=2) + "\n")

    def cell(r: dict[str, float]) -> str:
        return f"{r['recall@1']:.3f} / {r['recall@5']:.3f}"

    n_seen, n_unseen = results[0]["studio_seen_skus"]["queries"], results[0]["studio_unseen_skus"]["queries"]
    lines = [
        "# Studio-shelf pairs in training, measured on studio shots the model never saw",
        "",
        f"`{command}`. Val photos as queries, exact search; recall@1 / @5. The studio catalogue holds every SKU's "
        f'shot; "seen" are the {n_seen} val photos whose SKU\'s shot was in `--studio-pairs`, "unseen" the other '
        f"{n_unseen}: studio shots never trained on (their SKUs' shelf photos were, as for every model here).",
        "",
        "| model | train catalogue | studio catalogue, all | studio, seen SKUs | studio, unseen SKUs |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        cells = [cell(r[k]) for k in ("train_catalogue", "studio_catalogue", "studio_seen_skus", "studio_unseen_skus")]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    (out / "studio_pairs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split")
    sp.add_argument("--dataset", type=Path, required=True)
    sp.add_argument("--out", type=Path, required=True)
    sp.add_argument("--seed", type=int, default=0)
    mp = sub.add_parser("measure")
    mp.add_argument("--dataset", type=Path, required=True)
    mp.add_argument("--split", type=Path, required=True, help="the `split` directory")
    mp.add_argument("--models", type=Path, nargs="+", required=True)
    mp.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    if args.cmd == "split":
        write_split(args.dataset, args.out, args.seed)
        return
    with (args.split / "studio_seen.csv").open(newline="", encoding="utf-8") as fh:
        seen = {r["sku"] for r in csv.DictReader(fh)}
    results = [measure_model(m, args.dataset, seen) for m in args.models]
    command = "python scripts/measure_studio_pairs.py measure --models " + " ".join(str(m) for m in args.models)
    write_report(results, args.out, command)


if __name__ == "__main__":
    main()
