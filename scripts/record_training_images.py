"""Record in a model card what the model was trained on, so that index builds can tell when their own photos
flatter the router's measurement, and what the router gives on photos the model never saw.

    python scripts/record_training_images.py --dataset ../shared/datasets/grocery-store \
        --model models/grocery-lite0-ms512 [--train-split train] [--unseen-split val] [--also-trained-on CSV ...]

Writes <model>/training_images.sha256 (the sha256 of every training photo's bytes, sorted, one per line) and sets
the card's `training_images`; embeds both splits and records `evaluation.router_unseen`: the top-1 accuracy on the
unseen photos of the router an index build fits on the training photos by default (app.offline.routing.fit.fit_router).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from app.engine.embedding import OnnxEmbedder
from app.offline.datasets.catalogue import read_catalogue
from app.offline.datasets.grocery import split_rows
from app.offline.routing.fit import fit_router

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_models import embed_rows

FINGERPRINT = "training_images.sha256"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--train-split", default="train")
    ap.add_argument("--unseen-split", default="val")
    ap.add_argument(
        "--also-trained-on",
        type=Path,
        nargs="*",
        default=[],
        help="catalogue CSVs of more training photos (vps train --studio-pairs), paths relative to --dataset",
    )
    args = ap.parse_args()

    train = split_rows(args.dataset, args.train_split)
    extra = [row.image for path in args.also_trained_on for row in read_catalogue(path)[0]]
    photos = [r["image"] for r in train] + extra
    digests = sorted({hashlib.sha256((args.dataset / image).read_bytes()).hexdigest() for image in photos})
    (args.model / FINGERPRINT).write_text("\n".join(digests) + "\n")

    embedder = OnnxEmbedder(args.model, intra_op_threads=2)
    unseen = split_rows(args.dataset, args.unseen_split)
    categories = sorted({r["category"] for r in train})
    index = {c: i for i, c in enumerate(categories)}
    router = fit_router(
        "prototype",
        embed_rows(embedder, args.dataset, train),
        np.asarray([index[r["category"]] for r in train]),
        categories,
    )
    predicted = router.logits(embed_rows(embedder, args.dataset, unseen)).argmax(axis=1)
    top1 = float(np.mean(predicted == np.asarray([index[r["category"]] for r in unseen])))

    card_path = args.model / "model.json"
    card = json.loads(card_path.read_text())
    card["training_images"] = FINGERPRINT
    card.setdefault("evaluation", {})["router_unseen"] = {
        "top1": round(top1, 4),
        "router": router.kind,
        "catalogue": f"{args.train_split} split ({len(train)} photos, the model's training photos)",
        "queries": f"{args.unseen_split} split ({len(unseen)} photos the model never trained on)",
        "command": "python scripts/record_training_images.py --dataset DATASET --model " + str(args.model),
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"{args.model}: {len(digests)} training images recorded; router top-1 on unseen photos {top1:.4f}")


if __name__ == "__main__":
    main()
