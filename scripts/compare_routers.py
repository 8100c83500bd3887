"""Category routers side by side on photos the model never saw: router top-1 on the grocery val photos, the
train photos as the catalogue (what an index build fits on).

    python scripts/compare_routers.py --dataset ../shared/datasets/grocery-store \
        --models models/grocery-lite0-ms512 models/grocery-lite0-ms512-cat --out docs/bench

Table 1, router top-1 on val: the linear router (app.offline.routing.fit.fit_linear_router), nearest-prototype
routers (app.offline.routing.fit.fit_prototype_router: k-means prototypes per category, the best prototype's
cosine per category) and k-nearest-neighbour votes over every catalogue photo (what a router that searched
everything would know).
Table 2, what the build decides (first model only): the build's own calibration without query photos
(app.offline.routing.calibrate.train_router on held-out groups) beside what val photos give under the policy it
chose: router top-1 both ways, shards a query before filling to k, and the routing loss of recall@1 / @5 on val.
Writes <out>/compare_routers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from app.engine.embedding import OnnxEmbedder
from app.offline.datasets.grocery import split_rows
from app.offline.evaluate.metrics import top_skus
from app.offline.routing.calibrate import _Photos, routed_top_skus, train_router
from app.offline.routing.fit import fit_linear_router, fit_prototype_router

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_models import embed_rows


def prototype_scores(
    train: np.ndarray, labels: np.ndarray, queries: np.ndarray, categories: list[str], p: int
) -> np.ndarray:
    out: np.ndarray = fit_prototype_router(train, labels, categories, per_category=p).logits(queries)
    return out


def knn_votes(train: np.ndarray, labels: np.ndarray, queries: np.ndarray, n_cat: int, k: int) -> np.ndarray:
    top = np.argsort(-(queries @ train.T), axis=1)[:, :k]
    votes = np.zeros((len(queries), n_cat))
    for j in range(k):
        np.add.at(votes, (np.arange(len(queries)), labels[top[:, j]]), 1.0)
    return votes


def build_decision(
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray],
    queries: tuple[np.ndarray, np.ndarray, np.ndarray],
    categories: list[str],
    kind: str,
    per_category: int,
) -> dict[str, float | str]:
    """What the build measures and chooses without query photos, and what val photos give under that choice."""
    x, labels, skus = catalogue
    router, report = train_router(
        x, labels, categories, skus.tolist(), router_kind=kind, prototypes_per_category=per_category,
        exhaustive_below=0,  # measure the policy, not the small-index shortcut
    )  # fmt: skip
    qx, ql, qs = queries
    probs = router.predict_proba(qx)
    photos = _Photos(x, labels, skus)
    shard_skus = np.asarray([len(set(skus[labels == c].tolist())) for c in range(len(categories))])
    ex1 = ex5 = hit1 = hit5 = shards = 0
    for i in range(len(qx)):
        sims = x @ qx[i]
        exhaustive = top_skus(sims, skus, 5)
        one, n = routed_top_skus(sims, probs[i], photos, shard_skus, report.probe_mass, report.max_probes, k=1)
        five, _ = routed_top_skus(sims, probs[i], photos, shard_skus, report.probe_mass, report.max_probes, k=5)
        ex1, ex5 = ex1 + (exhaustive[:1] == [qs[i]]), ex5 + (qs[i] in exhaustive)
        hit1, hit5, shards = hit1 + (one == [qs[i]]), hit5 + (qs[i] in five), shards + n
    q = len(qx)
    return {
        "build_top1": report.router_top1,
        "val_top1": round(float((probs.argmax(axis=1) == ql).mean()), 4),
        "policy": report.policy_label(),
        "build_shards": report.mean_shards,
        "val_shards": round(shards / q, 3),
        "val_loss1_points": round(100 * (ex1 - hit1) / q, 2),
        "val_loss5_points": round(100 * (ex5 - hit5) / q, 2),
    }


def decision_rows(
    embedder: OnnxEmbedder, dataset: Path, categories: list[str], val: tuple[np.ndarray, np.ndarray, np.ndarray]
) -> dict[str, dict[str, float | str]]:
    index = {c: i for i, c in enumerate(categories)}
    out: dict[str, dict[str, float | str]] = {}
    for split in ("train", "iconic"):
        rows = split_rows(dataset, split)
        catalogue = (
            embed_rows(embedder, dataset, rows),
            np.asarray([index[r["category"]] for r in rows]),
            np.asarray([r["sku"] for r in rows]),
        )
        kinds = [("linear", 0), ("prototype", 8), ("prototype", 16), ("prototype", 32)]
        for kind, p in kinds if split == "train" else [("linear", 0), ("prototype", 16)]:
            name = f"{split} catalogue, {kind}" + (f" {p}" if p else "")
            out[name] = build_decision(catalogue, val, categories, kind, p or 16)
            print(name, out[name], flush=True)
    return out


def write_tables(out: Path, results: dict[str, dict[str, float]], decisions: dict[str, dict[str, float | str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_routers.json").write_text(json.dumps({"val_top1": results, "build": decisions}, indent=2) + "\n")
    names = list(next(iter(results.values())))
    lines = ["| router | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {r} | " + " | ".join(f"{results[m][r]:.3f}" for m in results) + " |" for r in names]
    cols = ["build_top1", "val_top1", "policy", "build_shards", "val_shards", "val_loss1_points", "val_loss5_points"]
    table2 = ["| catalogue, router | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    table2 += [f"| {name} | " + " | ".join(str(d[c]) for c in cols) + " |" for name, d in decisions.items()]
    (out / "compare_routers.md").write_text(
        "Router top-1 on grocery val (296 photos), train photos as the catalogue "
        "(`python scripts/compare_routers.py`).\n\n" + "\n".join(lines) + "\n\n"
        f"What the build decides without query photos ({next(iter(results))}): its own router top-1 on held-out "
        "groups, val's, the policy it chose, shards a query before filling to k (held-out / val), and val's routing "
        "loss in points against every shard (k=1 and k=5 answers).\n\n" + "\n".join(table2) + "\n"
    )


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
    decisions: dict[str, dict[str, float | str]] = {}
    for model in args.models:
        embedder = OnnxEmbedder(model, intra_op_threads=2)
        train, val = embed_rows(embedder, args.dataset, train_rows), embed_rows(embedder, args.dataset, val_rows)
        n = len(categories)
        scores = {"linear": fit_linear_router(train, tl, categories).logits(val)}
        for p in (1, 4, 8, 16, 32):
            scores[f"nearest prototype, {p} per category"] = prototype_scores(train, tl, val, categories, p)
        for k in (1, 5, 10):
            scores[f"{k}-NN votes over every photo"] = knn_votes(train, tl, val, n, k)
        results[model.name] = {name: round(float((s.argmax(axis=1) == vl).mean()), 4) for name, s in scores.items()}
        print(model.name, results[model.name], flush=True)
        if not decisions:
            decisions = decision_rows(
                embedder, args.dataset, categories, (val, vl, np.asarray([r["sku"] for r in val_rows]))
            )
    write_tables(args.out, results, decisions)


if __name__ == "__main__":
    main()
