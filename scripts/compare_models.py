"""Compare embedding models side by side: SKU recall by exact search, and per-image embed latency.

    python scripts/compare_models.py --dataset ../shared/datasets/grocery-store \
        --models models/grocery-lite0-ms512 models/grocery-lite0-ms512-int8 --out docs/bench [--record]

Recall: train photos as the catalogue and val photos as queries, and the studio (iconic) images as the catalogue.
Latency: one image per call (batch 1), ONNX Runtime intra-op threads 1, the models interleaved round by round so
machine noise hits them alike; the ratio is the figure to trust. `--record` writes the figures into each card.
Writes <out>/compare_models.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from app.engine.embedding import OnnxEmbedder, decode_side
from app.engine.imaging import decode_image
from app.offline.datasets.grocery import split_rows
from app.offline.evaluate.metrics import sku_recall


def embed_rows(embedder: OnnxEmbedder, root: Path, rows: list[dict[str, str]]) -> np.ndarray:
    side = decode_side(embedder.card.input)

    def load(r: dict[str, str]) -> np.ndarray:
        return embedder.preprocess(decode_image((root / r["image"]).read_bytes(), max_pixels=10**8, min_side=side))

    with ThreadPoolExecutor(2) as pool:
        arrays = list(pool.map(load, rows))
    return np.vstack([embedder.embed(np.stack(arrays[i : i + 32])) for i in range(0, len(arrays), 32)])


def embed_latency(models: list[Path], dataset: Path, val: list[dict[str, str]], rounds: int) -> dict[Path, list[float]]:
    """Per-call embed times (ms) of the preprocessed tensor of one val photo (the first 20 in turn), batch 1, ONNX
    Runtime intra-op threads 1, the models interleaved call by call: `rounds` calls each after a warm-up of 5."""
    single = {m: OnnxEmbedder(m, intra_op_threads=1) for m in models}
    samples = {
        m: [e.preprocess(decode_image((dataset / r["image"]).read_bytes(), max_pixels=10**8))[None] for r in val[:20]]
        for m, e in single.items()
    }
    times: dict[Path, list[float]] = {m: [] for m in models}
    for m, e in single.items():  # warm-up
        for x in samples[m][:5]:
            e.embed(x)
    for i in range(rounds):
        for m, e in single.items():
            x = samples[m][i % len(samples[m])]
            t0 = time.perf_counter()
            e.embed(x)
            times[m].append((time.perf_counter() - t0) * 1000)
    return times


def training_seconds(evaluation: dict[str, Any]) -> float | None:
    """Training wall time from the card's epoch history (what `vps train` measured), None for untrained models."""
    history = evaluation.get("history") or []
    total = sum(float(h.get("train_s", 0.0)) + float(h.get("eval_s", 0.0)) for h in history)
    return round(total, 1) if total else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--models", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--record", action="store_true", help="write the figures into each model card")
    args = ap.parse_args()

    train, val, iconic = (split_rows(args.dataset, s) for s in ("train", "val", "iconic"))
    vskus = [r["sku"] for r in val]
    results: dict[str, dict[str, Any]] = {}
    batch_embedders = {m: OnnxEmbedder(m, intra_op_threads=2) for m in args.models}
    for m, emb in batch_embedders.items():
        q = embed_rows(emb, args.dataset, val)
        shelf = sku_recall(q, vskus, embed_rows(emb, args.dataset, train), [r["sku"] for r in train], (1, 5))
        studio = sku_recall(q, vskus, embed_rows(emb, args.dataset, iconic), [r["sku"] for r in iconic], (1, 5))
        results[str(m)] = {
            "name": emb.card.name,
            "train_catalogue": {"recall@1": round(shelf[1], 4), "recall@5": round(shelf[5], 4)},
            "studio_catalogue": {"recall@1": round(studio[1], 4), "recall@5": round(studio[5], 4)},
            "train_s": training_seconds(emb.card.evaluation),
        }

    times = embed_latency(args.models, args.dataset, val, args.rounds)
    base = float(np.median(times[args.models[0]]))
    for m in args.models:
        t = np.asarray(times[m])
        results[str(m)]["embed_latency_ms"] = {
            "p50": round(float(np.median(t)), 2),
            "p99": round(float(np.percentile(t, 99)), 2),
            "ratio_to_first": round(float(np.median(t)) / base, 3),
        }

    out = {"machine": {"cpus": os.cpu_count()}, "rounds": args.rounds, "models": results}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_models.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        "# Embedding models side by side",
        "",
        "| model | recall@1 | recall@5 | studio recall@1 | studio recall@5 | embed p50 ms | p99 ms | p50 ratio "
        "| training min |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        lat = r["embed_latency_ms"]
        lines.append(
            f"| {r['name']} | {r['train_catalogue']['recall@1']} | {r['train_catalogue']['recall@5']} | "
            f"{r['studio_catalogue']['recall@1']} | {r['studio_catalogue']['recall@5']} | {lat['p50']} | "
            f"{lat['p99']} | {lat['ratio_to_first']} | "
            f"{'-' if r['train_s'] is None else round(r['train_s'] / 60)} |"
        )
    lines += [
        "",
        "Recall: exact search, val photos as queries. Latency: batch 1, 1 intra-op thread, interleaved. Training: "
        "the card's epoch history (training and validation), on the 2-core machine; an int8 model shows its fp32 "
        "model's.",
    ]
    (args.out / "compare_models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    if args.record:
        for m in args.models:
            card_path = m / "model.json"
            card = json.loads(card_path.read_text())
            card.setdefault("evaluation", {})["measured_by_compare_models"] = {
                "command": "python scripts/compare_models.py --models " + " ".join(str(x) for x in args.models),
                "results": results,
            }
            card_path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
