"""Does training on mined hard-negative pairs raise recall? Two training runs that differ only in the pair batches.

    python scripts/measure_hard_negatives.py --dataset ../shared/datasets/grocery-store [--seed 0] [--out docs/bench]

Issue 23 item 4, on the shared dataset, end to end through the tools a team would use:
1. The val photos are split (seeded, as `measure_mining.py` splits them) into a labelling half and an evaluation
   half. An index of the train photos is built with the mining model (`--mine-model`, default the Lite0 model
   this recipe trains), and `mine_vectors` ranks the labelling half (`--budget` photos at most).
2. The queue is "labelled" with each photo's true SKU and taken back by `import_labels(..., "pairs")`, the code
   behind `vps label import --as pairs`: anchor photo, its SKU, the SKU the index confused it with.
3. `vps train`'s recipe (Lite0, multi-similarity loss, 12 epochs, seed) runs twice on the train photos plus the
   same anchors: once with `hard_share` 0.5 (half of each batch's SKUs drawn as confused pairs) and once with 0
   (the anchors only, ordinary P x K batches). Neither run validates, so the last epoch is kept: no checkpoint is
   chosen on the evaluation half.
4. Both are exported to ONNX and measured by exact search on the evaluation half: train-photo catalogue and studio
   catalogue, recall@1/5, and recall@1 on the evaluation photos of the confused SKUs: both SKUs of each queue row
   the mining index got wrong at top 1, where the pairs should help most.

Training is the cost: 18-35 minutes per run on 2 cores (shared or not). A rerun resumes each run from its last.pt
(the work directory keeps them). Writes <out>/measure_hard_negatives.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compare_models import embed_rows  # scripts/ is on sys.path when run as a script
from measure_mining import build, embedded

from app.engine.embedding import OnnxEmbedder
from app.offline.datasets.catalogue import write_catalogue
from app.offline.datasets.grocery import split_rows
from app.offline.evaluate.metrics import sku_recall
from app.offline.export.export_model import export_checkpoint
from app.offline.mining.jobs import import_labels
from app.offline.mining.mine import mine_vectors, queue_rows, write_queue
from app.offline.train.train_embedding import TrainConfig, train

warnings.filterwarnings("ignore", module=r"torch\.onnx")  # the exporter's constant-folding notes, not ours to fix

ARMS = {"pairs": 0.5, "anchors-only": 0.0}  # hard_share of each arm


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Steps 1-2: the split, the mined queue labelled with the truth, the pairs CSV and the training CSVs."""
    embedder = OnnxEmbedder(args.mine_model, intra_op_threads=2)
    cat_x, cat_rows = embedded(args.dataset, "train", work, embedder)
    val_x, val_rows = embedded(args.dataset, "val", work, embedder)
    order = np.random.default_rng(args.seed).permutation(len(val_rows))
    half = len(order) // 2
    pool, held = order[:half], order[half:]
    base = build(
        cat_x, cat_rows, [], val_x[pool], [val_rows[i] for i in pool], work / "base", embedder, args.mine_model
    )
    named = [(val_rows[i].image, val_x[i]) for i in pool]
    queue = mine_vectors(base, named, args.budget).queue
    truth = {r.image: r.sku for r in val_rows}
    rows = queue_rows(queue, base)
    for r in rows:
        r["sku"] = truth[r["photo"]]  # the labeller's answer
    write_queue(rows, work / "queue.csv")
    pairs = work / "pairs.csv"
    pairs.unlink(missing_ok=True)
    n_pairs = import_labels(work / "queue.csv", "pairs", pairs, {r.sku: r.category for r in cat_rows})
    write_catalogue(work / "train.csv", split_rows(args.dataset, "train"))
    val = split_rows(args.dataset, "val")
    by_image = {r["image"]: r for r in val}
    write_catalogue(work / "eval.csv", [by_image[val_rows[i].image] for i in held])
    wrong = sum(r["suggested_sku"] != r["sku"] for r in rows)
    return {"queue": len(rows), "queue_wrong_at_top1": wrong, "pairs": n_pairs, "eval": len(held)}


def train_arm(args: argparse.Namespace, work: Path, arm: str, share: float) -> Path:
    """Step 3 for one arm (resumes from its last.pt); returns the exported model directory."""
    model_dir = work / f"model-{arm}"
    if (model_dir / "model.onnx").exists():
        return model_dir
    cfg = TrainConfig(
        catalogue=work / "train.csv",
        images_root=args.dataset,
        out_dir=work / f"run-{arm}",
        epochs=args.epochs,
        seed=args.seed,
        hard_negatives=work / "pairs.csv",
        pairs_root=args.dataset,
        hard_share=share,
    ).resolved()
    t0 = time.perf_counter()
    train(cfg)
    (work / f"run-{arm}" / "wall_s.txt").write_text(f"{time.perf_counter() - t0:.0f}\n")
    export_checkpoint(work / f"run-{arm}" / "best.pt", model_dir, f"hn-{arm}")
    return model_dir


def evaluate(args: argparse.Namespace, work: Path, model_dir: Path) -> dict[str, float]:
    """Step 4: exact-search recall on the evaluation half, overall and on the SKUs the pairs name."""
    import csv

    embedder = OnnxEmbedder(model_dir, intra_op_threads=2)
    with (work / "eval.csv").open(newline="", encoding="utf-8") as fh:
        queries = list(csv.DictReader(fh))
    with (work / "queue.csv").open(newline="", encoding="utf-8") as fh:
        # The SKUs of the pairs the mining index got wrong at top 1 (both sides): where the pairs should help.
        confused = {
            s for r in csv.DictReader(fh) if r["suggested_sku"] != r["sku"] for s in (r["sku"], r["suggested_sku"])
        }
    q = embed_rows(embedder, args.dataset, queries)
    q_skus = [r["sku"] for r in queries]
    out: dict[str, float] = {}
    for name, split in (("train", "train"), ("studio", "iconic")):
        rows = split_rows(args.dataset, split)
        c = embed_rows(embedder, args.dataset, rows)
        c_skus = [r["sku"] for r in rows]
        rec = sku_recall(q, q_skus, c, c_skus, (1, 5))
        out[f"{name}_recall1"], out[f"{name}_recall5"] = round(rec[1], 4), round(rec[5], 4)
        sel = [i for i, s in enumerate(q_skus) if s in confused]
        sub = sku_recall(q[sel], [q_skus[i] for i in sel], c, c_skus, (1,))
        out[f"{name}_confused_recall1"] = round(sub[1], 4)
    out["confused_queries"] = sum(s in confused for s in q_skus)
    out["confused_skus"] = len(confused)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=Path("../shared/datasets/grocery-store"))
    ap.add_argument("--mine-model", type=Path, default=Path("models/grocery-lite0-ms512"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=148, help="photos the queue holds at most (the labelling half)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "vps-measure-hard-negatives")
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    work = args.work / f"seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare(args, work)
    print(json.dumps(setup), flush=True)
    results = {}
    for arm, share in ARMS.items():
        model_dir = train_arm(args, work, arm, share)
        results[arm] = {"hard_share": share, **evaluate(args, work, model_dir)}
        results[arm]["train_wall_s"] = float((work / f"run-{arm}" / "wall_s.txt").read_text())
        print(json.dumps({arm: results[arm]}), flush=True)
    doc = {
        "command": " ".join(["python scripts/measure_hard_negatives.py", *sys.argv[1:]]),
        "mine_model": args.mine_model.name,
        "seed": args.seed,
        "epochs": args.epochs,
        "cpus": os.cpu_count(),
        "setup": setup,
        "arms": results,
        "run_s": round(time.perf_counter() - t0, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "measure_hard_negatives.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    (args.out / "measure_hard_negatives.md").write_text(text)
    sys.stdout.write(text)


def markdown(doc: dict[str, Any]) -> str:
    s = doc["setup"]
    lines = [
        "# Training with mined hard-negative pairs against the same anchors without them",
        "",
        f"`{doc['command']}` — seed {doc['seed']}; {s['queue']} photos mined from the labelling half with "
        f"{doc['mine_model']} ({s['queue_wrong_at_top1']} wrong at top 1), {s['pairs']} pairs; both runs train "
        f"Lite0 for {doc['epochs']} epochs on the train photos plus the same anchors and keep the last epoch. "
        f"Evaluated by exact search on the other {s['eval']} val photos. Run {doc['run_s']:.0f} s.",
        "",
        "| run | hard share | train cat. R@1 / R@5 | confused SKUs R@1 | studio cat. R@1 / R@5 | confused SKUs R@1 "
        "(studio) | training |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in doc["arms"].items():
        lines.append(
            f"| {arm} | {r['hard_share']} | {r['train_recall1']:.3f} / {r['train_recall5']:.3f} | "
            f"{r['train_confused_recall1']:.3f} ({r['confused_queries']} photos, {r['confused_skus']} SKUs) | "
            f"{r['studio_recall1']:.3f} / {r['studio_recall5']:.3f} | {r['studio_confused_recall1']:.3f} | "
            f"{r['train_wall_s'] / 60:.0f} min |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
