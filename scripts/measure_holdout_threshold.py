"""How the build's no-query calibration depends on its near-duplicate threshold, per model (issue #20, item 7).

    python scripts/measure_holdout_threshold.py --dataset ../shared/datasets/grocery-store \
        --models models/grocery-lite0-ms512 models/grocery-lite1-ms512-int8 --cosines 0.8 0.85 0.9 0.95

Train photos as the catalogue, no calibration queries: the router is measured on held-out near-duplicate groups
of its own photos (app/offline/routing/calibrate.py) with each threshold, and its top-1 on those groups is set
beside its top-1 on the val photos (which it never saw) and the policy the build would choose (the demo's
"small index: every shard" rule off). Writes <out>/holdout_threshold.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from compare_models import embed_rows

from app.engine.embedding import OnnxEmbedder
from app.offline.datasets.grocery import split_rows
from app.offline.routing.calibrate import train_router


def measure(model: Path, dataset: Path, cosines: list[float]) -> list[dict[str, Any]]:
    train, val = split_rows(dataset, "train"), split_rows(dataset, "val")
    categories = sorted({r["category"] for r in train})
    cat = {c: i for i, c in enumerate(categories)}
    embedder = OnnxEmbedder(model, intra_op_threads=2)
    t, q = embed_rows(embedder, dataset, train), embed_rows(embedder, dataset, val)
    labels, q_labels = (np.asarray([cat[r["category"]] for r in rows]) for rows in (train, val))
    out = []
    for cosine in cosines:
        router, report = train_router(
            t, labels, categories, [r["sku"] for r in train], near_duplicate_cosine=cosine, exhaustive_below=0
        )
        out.append(
            {
                "model": model.name,
                "cosine": cosine,
                "measured_photos": report.calibration_queries,  # after the build's cap on measured photos
                "source": report.calibration_source,
                "held_out_top1": report.router_top1,
                "val_top1": round(float((router.predict_proba(q).argmax(1) == q_labels).mean()), 4),
                "policy": report.policy_reason,
                "shards": report.mean_shards,
                "loss_at_most_probes": report.candidates[-1] if report.candidates else None,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--models", type=Path, nargs="+", required=True)
    ap.add_argument("--cosines", type=float, nargs="+", default=[0.8, 0.85, 0.9, 0.95])
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    rows = [r for m in args.models for r in measure(m, args.dataset, args.cosines)]
    command = "python scripts/measure_holdout_threshold.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "holdout_threshold.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# No-query calibration against its near-duplicate threshold",
        "",
        f"`{command}`. Train photos as the catalogue; router top-1 on the held-out photos (source: what the build"
        " held out) and on val.",
        "",
        "| model | threshold | held out (source) | photos measured | held-out top-1 | val top-1 | policy | shards a "
        "query |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['cosine']} | {r['source']} | {r['measured_photos']} | {r['held_out_top1']:.3f} | "
            f"{r['val_top1']:.3f} | {r['policy']} | {r['shards']} |"
        )
    (args.out / "holdout_threshold.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
