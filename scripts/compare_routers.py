"""Category routers side by side on photos the model never saw: router top-1 on the grocery val photos, the
train photos as the catalogue (what an index build fits on).

    python scripts/compare_routers.py --dataset ../shared/datasets/grocery-store \
        --models models/grocery-lite0-ms512 models/grocery-lite0-ms512-cat --out docs/bench

Routers: the linear router the build fits (app.offline.routing.fit.fit_linear_router), nearest-prototype
routers (k-means prototypes per category, the best prototype's cosine per category) and k-nearest-neighbour
votes over every catalogue photo (what a router that searched everything would know).
Writes <out>/compare_routers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import faiss
import numpy as np

from app.engine.embedding import OnnxEmbedder
from app.offline.datasets.grocery import split_rows
from app.offline.routing.fit import fit_linear_router

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_models import embed_rows


def prototype_scores(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_cat: int, p: int) -> np.ndarray:
    scores = np.full((len(queries), n_cat), -np.inf)
    for c in range(n_cat):
        members = np.ascontiguousarray(train[labels == c])
        if len(members) > p:
            km = faiss.Kmeans(members.shape[1], p, niter=20, seed=0, spherical=True, min_points_per_centroid=1)
            km.train(members)
            members = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True)
        scores[:, c] = (queries @ members.T).max(axis=1)
    return scores


def knn_votes(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_cat: int, k: int) -> np.ndarray:
    top = np.argsort(-(queries @ train.T), axis=1)[:, :k]
    votes = np.zeros((len(queries), n_cat))
    for j in range(k):
        np.add.at(votes, (np.arange(len(queries)), labels[top[:, j]]), 1.0)
    return votes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, required=True)
    ap.add_argument("--models", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, default=Path("docs/bench"))
    args = ap.parse_args()
    train_rows, val_rows = split_rows(args.dataset, "train"), split_rows(args.dataset, "val")
    categories = sorted({r["category"] for r in train_rows})
    index = {c: i for i, c in enumerate(categories)}
    tl = np.asarray([index[r["category"]] for r in train_rows])
    vl = np.asarray([index[r["category"]] for r in val_rows])
    results: dict[str, dict[str, float]] = {}
    for model in args.models:
        embedder = OnnxEmbedder(model, intra_op_threads=2)
        train, val = embed_rows(embedder, args.dataset, train_rows), embed_rows(embedder, args.dataset, val_rows)
        n = len(categories)
        scores = {"linear (the build's)": fit_linear_router(train, tl, categories).logits(val)}
        for p in (1, 4, 16):
            scores[f"nearest prototype, {p} per category"] = prototype_scores(train, tl, val, n, p)
        for k in (1, 5, 10):
            scores[f"{k}-NN votes over every photo"] = knn_votes(train, tl, val, n, k)
        results[model.name] = {name: round(float((s.argmax(axis=1) == vl).mean()), 4) for name, s in scores.items()}
        print(model.name, results[model.name])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare_routers.json").write_text(json.dumps(results, indent=2) + "\n")
    names = list(next(iter(results.values())))
    lines = ["| router | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {r} | " + " | ".join(f"{results[m][r]:.3f}" for m in results) + " |" for r in names]
    (args.out / "compare_routers.md").write_text(
        "Router top-1 on grocery val (296 photos), train photos as the catalogue "
        "(`python scripts/compare_routers.py`).\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
