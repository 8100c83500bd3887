"""int8 variants of one model side by side: `vps quantize-model`'s calibration method, photo count and the MBConv
blocks left in float, each measured for recall as scripts/compare_models.py measures it.

    python scripts/measure_int8.py --dataset ../shared/datasets/grocery-store --model models/grocery-lite1-ms512 \
        --variants percentile:128:4 minmax:256:4 --out docs/bench --tag lite1

A variant is METHOD:PHOTOS:FLOAT_BLOCKS. Weights are 7-bit, as `vps quantize-model`'s default; `--full-range` gives
8-bit weights, which the outputs committed before model 1.1.0 used. Calibration photos are drawn from the train
split (seed 0). Writes <out>/measure_int8-TAG.json and .md; the quantised models stay under --work.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from compare_models import embed_rows

from app.engine.embedding import OnnxEmbedder
from app.offline.datasets.catalogue import write_catalogue
from app.offline.datasets.grocery import split_rows
from app.offline.evaluate.metrics import sku_recall
from app.offline.export.quantize import quantize_model


def recall(model: Path, dataset: Path) -> dict[str, float]:
    train, val, iconic = (split_rows(dataset, s) for s in ("train", "val", "iconic"))
    emb = OnnxEmbedder(model, intra_op_threads=2)
    q, skus = embed_rows(emb, dataset, val), [r["sku"] for r in val]
    shelf = sku_recall(q, skus, embed_rows(emb, dataset, train), [r["sku"] for r in train], (1, 5))
    studio = sku_recall(q, skus, embed_rows(emb, dataset, iconic), [r["sku"] for r in iconic], (1, 5))
    return {
        "recall@1": round(shelf[1], 4),
        "recall@5": round(shelf[5], 4),
        "studio_recall@1": round(studio[1], 4),
        "studio_recall@5": round(studio[5], 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--variants", nargs="+", default=["percentile:128:4", "minmax:256:4", "minmax:256:0"])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-int8")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--tag", default="")
    ap.add_argument("--full-range", action="store_true", help="8-bit weights (the runs before model 1.1.0)")
    args = ap.parse_args()

    calibration = args.work / "train.csv"
    args.work.mkdir(parents=True, exist_ok=True)
    write_catalogue(calibration, split_rows(args.dataset, "train"))
    rows: list[dict[str, Any]] = [{"variant": "fp32", **recall(args.model, args.dataset)}]
    for variant in args.variants:
        method, photos, float_blocks = variant.split(":")
        out = args.work / f"{args.model.name}-{method}-{photos}-{float_blocks}"
        t0 = time.perf_counter()
        quantize_model(
            args.model, calibration, args.dataset, out, n_images=int(photos), method=method,  # type: ignore[arg-type]
            float_blocks=int(float_blocks), reduce_range=not args.full_range,
        )  # fmt: skip
        rows.append({"variant": variant, "quantise_s": round(time.perf_counter() - t0, 1), **recall(out, args.dataset)})
        print(json.dumps(rows[-1]), flush=True)
    stem = f"measure_int8{'-' + args.tag if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=2) + "\n")
    md = [
        f"# int8 variants of `{args.model.name}`",
        "",
        "| variant (method:photos:float blocks) | recall@1 / @5 | studio recall@1 / @5 |",
        "|---|---|---|",
    ]
    md += [
        f"| {r['variant']} | {r['recall@1']} / {r['recall@5']} | {r['studio_recall@1']} / {r['studio_recall@5']} |"
        for r in rows
    ]
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
