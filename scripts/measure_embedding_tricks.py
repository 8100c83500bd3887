"""Measure the embedding tricks of issue #20 on one model, side by side: query-side flip averaging, catalogue-side
views of studio shots, database-side augmentation (DBA) and query expansion (alpha-QE).

    python scripts/measure_embedding_tricks.py --dataset ../shared/datasets/grocery-store \
        --model models/grocery-lite0-ms512 --out docs/bench

Queries are the val photos; catalogues are the train photos and the studio (iconic) images, searched exactly
(cosine, each SKU ranked by its best vector). Latency: per query, batch 1, one ONNX Runtime thread, the plain and
the flipped pass interleaved round by round; the ratio is the figure to trust. Writes <out>/embedding_tricks.json
and .md (embedding_tricks-TAG.* with --tag).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from app.engine.embedding import OnnxEmbedder, decode_side
from app.engine.imaging import decode_image
from app.offline.build.views import catalogue_views
from app.offline.datasets.grocery import split_rows
from app.offline.evaluate.metrics import sku_recall
from app.offline.evaluate.rerank import database_side_augmentation, query_expansion


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def load_images(embedder: OnnxEmbedder, root: Path, rows: list[dict[str, str]]) -> list[Image.Image]:
    side = decode_side(embedder.card.input)

    def load(r: dict[str, str]) -> Image.Image:
        return decode_image((root / r["image"]).read_bytes(), max_pixels=10**8, min_side=side)

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(load, rows))


def embed(embedder: OnnxEmbedder, images: list[Image.Image], *, flip: bool = False) -> np.ndarray:
    if flip:
        images = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in images]
    arrays = [embedder.preprocess(im) for im in images]
    return np.vstack([embedder.embed(np.stack(arrays[i : i + 32])) for i in range(0, len(arrays), 32)])


def recall(q: np.ndarray, qskus: list[str], c: np.ndarray, cskus: list[str]) -> dict[str, float]:
    r = sku_recall(q, qskus, c, cskus, (1, 5))
    return {"recall@1": round(r[1], 4), "recall@5": round(r[5], 4)}


def mean_recall(q: np.ndarray, qskus: list[str], cats: list[np.ndarray], cskus: list[str]) -> dict[str, float]:
    """Recall averaged over catalogues that differ only by their views' seed, with the spread (sd)."""
    runs = [recall(q, qskus, c, cskus) for c in cats]
    out = {k: round(float(np.mean([r[k] for r in runs])), 4) for k in ("recall@1", "recall@5")}
    out.update({f"{k}_sd": round(float(np.std([r[k] for r in runs])), 4) for k in ("recall@1", "recall@5")})
    return out


def expanded_recall(
    q: np.ndarray, qskus: list[str], c: np.ndarray, cskus: list[str], n: int, alpha: float
) -> dict[str, float]:
    return recall(query_expansion(q, c, n=n, alpha=alpha), qskus, c, cskus)


def latency(embedder: OnnxEmbedder, images: list[Image.Image], rounds: int) -> dict[str, float]:
    """Per-query embed time, batch 1 (plain) against batch 2 (the photo and its mirror), interleaved."""
    plain: list[float] = []
    flipped: list[float] = []
    for i in range(rounds):
        im = images[i % len(images)]
        x = embedder.preprocess(im)[None]
        t0 = time.perf_counter()
        embedder.embed(x)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mirror = embedder.preprocess(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[None]
        embedder.embed(np.concatenate([x, mirror]))
        flipped.append(time.perf_counter() - t0)
    p, f = float(np.median(plain)) * 1e3, float(np.median(flipped)) * 1e3
    return {"embed_ms_p50": round(p, 2), "flip_embed_ms_p50": round(f, 2), "flip_cost_x": round(f / p, 2)}


def main() -> None:  # long: one table, its rows in order
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    ap.add_argument("--views", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--tag", default="", help="suffix of the output files: embedding_tricks-TAG.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="view seeds, averaged")
    args = ap.parse_args()

    embedder = OnnxEmbedder(args.model, intra_op_threads=2)
    train, val, iconic = (split_rows(args.dataset, s) for s in ("train", "val", "iconic"))
    qskus, tskus, iskus = ([r["sku"] for r in rows] for rows in (val, train, iconic))
    val_im, train_im, iconic_im = (load_images(embedder, args.dataset, rows) for rows in (val, train, iconic))
    q, q_flip = embed(embedder, val_im), embed(embedder, val_im, flip=True)
    q_avg = _normalise(q + q_flip)
    t = embed(embedder, train_im)
    t_avg = _normalise(t + embed(embedder, train_im, flip=True))
    s = embed(embedder, iconic_im)
    s_avg = _normalise(s + embed(embedder, iconic_im, flip=True))
    most = max(args.views)
    views_by_seed = []  # each (skus, views, dim)
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        views_by_seed.append(np.stack([embed(embedder, catalogue_views(im, most, rng)) for im in iconic_im]))

    rows: list[dict[str, Any]] = []

    def row(name: str, shelf: dict[str, float] | None, studio: dict[str, float], cost: str) -> None:
        rows.append({"variant": name, "train_catalogue": shelf, "studio_catalogue": studio, "cost": cost})

    row("baseline", recall(q, qskus, t, tskus), recall(q, qskus, s, iskus), "-")
    row("flip-averaged queries", recall(q_avg, qskus, t, tskus), recall(q_avg, qskus, s, iskus), "query: 2 images")
    row(
        "flip-averaged queries and catalogue",
        recall(q_avg, qskus, t_avg, tskus),
        recall(q_avg, qskus, s_avg, iskus),
        "query: 2 images; build: 2x embedding",
    )
    for n in args.views:
        cat_skus = iskus + [sku for sku in iskus for _ in range(n)]
        cats = [np.vstack([s, v[:, :n].reshape(-1, v.shape[-1])]) for v in views_by_seed]
        cost = f"build: {n + 1}x studio vectors"
        row(f"studio + {n} augmented views", None, mean_recall(q, qskus, cats, cat_skus), cost)
        row(f"studio + {n} views, flip-averaged queries", None, mean_recall(q_avg, qskus, cats, cat_skus), cost)
    for k in (2, 3):
        row(
            f"DBA, top {k}",
            recall(q, qskus, database_side_augmentation(t, k), tskus),
            recall(q, qskus, database_side_augmentation(s, k), iskus),
            "build: one k-NN pass",
        )
    for n in (1, 2, 3):
        row(
            f"alpha-QE, top {n}, alpha 3",
            expanded_recall(q, qskus, t, tskus, n, 3.0),
            expanded_recall(q, qskus, s, iskus, n, 3.0),
            "query: a second search",
        )
    lat = latency(OnnxEmbedder(args.model, intra_op_threads=1), val_im, args.rounds)
    result = {"model": embedder.card.name, "queries": len(val), "rows": rows, "latency": lat}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"embedding_tricks{'-' + args.tag if args.tag else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"Model `{embedder.card.name}`, {len(val)} val queries, exact search. "
        f"Embed p50 batch 1: {lat['embed_ms_p50']} ms; with the mirror (batch 2): {lat['flip_embed_ms_p50']} ms "
        f"(x{lat['flip_cost_x']}). Views: mean over view seeds {args.seeds} (sd in brackets).",
        "",
        "| variant | recall@1 / @5 (train catalogue) | studio recall@1 / @5 | cost |",
        "|---|---|---|---|",
    ]
    for r in rows:
        shelf = r["train_catalogue"]
        st = r["studio_catalogue"]
        shelf_txt = f"{shelf['recall@1']:.3f} / {shelf['recall@5']:.3f}" if shelf else "-"
        spread = f" (sd {st['recall@1_sd']:.3f} / {st['recall@5_sd']:.3f})" if "recall@1_sd" in st else ""
        st_txt = f"{st['recall@1']:.3f} / {st['recall@5']:.3f}{spread}"
        md.append(f"| {r['variant']} | {shelf_txt} | {st_txt} | {r['cost']} |")
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
