"""Metric-learning pieces: losses, P x K sampler, augmentations, and a tiny train -> resume -> export run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")

from app.engine.embedding import OnnxEmbedder  # noqa: E402
from app.errors import CatalogueError  # noqa: E402
from app.offline.train.augment import shelf_augment  # noqa: E402
from app.offline.train.lite_input import BACKBONES  # noqa: E402
from app.offline.train.train_embedding import (  # noqa: E402
    EmbeddingNet,
    TrainConfig,
    hard_pair_batches,
    make_loss,
    pair_studio,
    pk_batches,
    read_pairs,
    read_studio_pairs,
    train,
)

pytestmark = pytest.mark.train


def _embeddings(separated: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(4)
    centres = torch.eye(8)[:4]
    noise = torch.randn(16, 8, generator=g) * (0.05 if separated else 1.0)
    emb = (centres[labels] if separated else torch.zeros(16, 8)) + noise
    return torch.nn.functional.normalize(emb, dim=1), labels


@pytest.mark.parametrize("name", ["ms", "triplet", "proxy_anchor"])
def test_losses_prefer_separated_classes(name: str) -> None:
    loss = make_loss(name, 4, 8)  # type: ignore[arg-type]
    if name == "proxy_anchor":
        with torch.no_grad():
            loss.loss.proxies.copy_(torch.eye(8)[:4])
    good, bad = loss(*_embeddings(True)).detach(), loss(*_embeddings(False)).detach()
    assert float(good) < float(bad)
    emb, labels = _embeddings(False)
    emb.requires_grad_(True)
    loss(emb, labels).backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def _multi_similarity_reference(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Wang et al. 2019, eq. 4 with the paper's pair mining (epsilon 0.1), averaged over anchors with mined pairs:
    the loss this project hand-wrote before moving to pytorch-metric-learning."""
    alpha, beta, base, eps = 2.0, 50.0, 0.5, 0.1
    sim = emb @ emb.T
    terms = []
    for i in range(len(labels)):
        same = labels == labels[i]
        same[i] = False
        pos, neg = sim[i][same], sim[i][labels != labels[i]]
        hard_neg, hard_pos = neg[neg + eps > pos.min()], pos[pos - eps < neg.max()]
        if len(hard_neg) and len(hard_pos):
            terms.append(
                torch.log1p(torch.exp(-alpha * (hard_pos - base)).sum()) / alpha
                + torch.log1p(torch.exp(beta * (hard_neg - base)).sum()) / beta
            )
    return torch.stack(terms).mean()


@pytest.mark.parametrize("seed", range(5))
def test_library_multi_similarity_is_the_paper_loss(seed: int) -> None:
    emb, labels = _embeddings(False, seed)
    got, want = make_loss("ms", 4, 8)(emb, labels), _multi_similarity_reference(emb, labels)
    assert abs(float(got) - float(want)) < 1e-5 * max(1.0, abs(float(want)))


def test_triplet_is_zero_beyond_the_margin() -> None:
    assert float(make_loss("triplet", 4, 8)(*_embeddings(True))) == 0.0


def test_pk_batches_are_class_balanced_and_seeded() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7 + [3] * 5)
    batches = pk_batches(labels, P=3, K=4, n_batches=20, seed=0)
    assert len(batches) == 20
    for b in batches:
        classes, counts = np.unique(labels[b], return_counts=True)
        assert len(classes) == 3 and (counts == 4).all()
    assert all(len(np.unique(labels[b])) == 4 for b in pk_batches(labels, P=9, K=2, n_batches=3, seed=0))  # P > SKUs
    again = pk_batches(labels, P=3, K=4, n_batches=20, seed=0)
    other = pk_batches(labels, P=3, K=4, n_batches=20, seed=1)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    assert any((a != b).any() for a, b in zip(batches, other, strict=True))


def test_hard_pair_batches_put_confused_skus_together() -> None:
    labels = np.repeat(np.arange(20), 5)
    pairs = np.array([[0, 1], [2, 3], [4, 5]])
    batches = hard_pair_batches(labels, pairs, P=8, K=2, n_batches=30, seed=0, share=0.5)
    for b in batches:
        classes, counts = np.unique(labels[b], return_counts=True)
        assert len(classes) == 8 and (counts == 2).all()
        together = sum(int(a in classes and c in classes) for a, c in pairs)
        assert together >= 2  # int(8 * 0.5) // 2 pairs at least
    again = hard_pair_batches(labels, pairs, P=8, K=2, n_batches=30, seed=0, share=0.5)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))
    plain = hard_pair_batches(labels, pairs, P=8, K=2, n_batches=200, seed=0, share=0.0)
    met = np.mean([int(0 in labels[b] and 1 in labels[b]) for b in plain])
    assert met < 0.5  # without the share, 0 and 1 meet about (8/20) * (7/19) of the time


def test_read_pairs_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("anchor,sku,negative_sku\nq/1.jpg,a,b\nq/2.jpg,b,a\nq/3.jpg,a,zz\n")
    with pytest.raises(CatalogueError, match=r"pairs.csv:4: SKU 'zz' is not in the training catalogue"):
        read_pairs(path, {"a": "x", "b": "x"}, {"a": 0, "b": 1})
    path.write_text("anchor,sku,negative_sku\nq/1.jpg,a,b\nq/2.jpg,b,a\nq/1.jpg,a,c\n")
    anchors, pairs = read_pairs(path, {"a": "x", "b": "y", "c": "y"}, {"a": 0, "b": 1, "c": 2})
    assert [(r.sku, r.category, r.image) for r in anchors] == [("a", "x", "q/1.jpg"), ("b", "y", "q/2.jpg")]
    assert pairs.tolist() == [[0, 1], [0, 2]]  # q/1.jpg confused with b and with c: one anchor, two pairs


def test_pair_studio_puts_one_studio_shot_beside_each_skus_shelf_photos() -> None:
    labels = np.concatenate([np.repeat(np.arange(6), 5), [0, 0, 3]])  # rows 30, 31: SKU 0's shots; 32: SKU 3's
    studio_rows = {0: np.array([30, 31]), 3: np.array([32])}
    batches = pk_batches(labels[:30], P=4, K=3, n_batches=40, seed=0)
    paired = pair_studio(batches, labels, studio_rows, seed=0)
    for before, after in zip(batches, paired, strict=True):
        assert (labels[before] == labels[after]).all()  # every position keeps its SKU
        for sku in np.unique(labels[before]):
            shots = np.isin(after[labels[after] == sku], studio_rows.get(int(sku), []))
            assert shots.sum() == (1 if int(sku) in studio_rows else 0)
    drawn = np.concatenate(paired)
    assert {30, 31} <= set(drawn.tolist())  # both of SKU 0's shots are used
    assert all((a == b).all() for a, b in zip(paired, pair_studio(batches, labels, studio_rows, seed=0), strict=True))
    assert pair_studio(batches, labels, {}, seed=0) is batches


def test_read_studio_pairs_takes_the_training_category_and_names_unknown_skus(tmp_path: Path) -> None:
    path = tmp_path / "studio.csv"
    path.write_text("sku,category,image\na,whatever,s/a.jpg\n")
    assert [(r.sku, r.category) for r in read_studio_pairs(path, {"a": "x"})] == [("a", "x")]
    path.write_text("sku,category,image\na,x,s/a.jpg\nzz,x,s/zz.jpg\n")
    with pytest.raises(CatalogueError, match=r"studio.csv:3: SKU 'zz' is not in the training catalogue"):
        read_studio_pairs(path, {"a": "x"})


@pytest.mark.parametrize("name", ["lite1", "lite2"])
def test_bigger_backbones_load_their_shipped_weights(name: str) -> None:
    spec = BACKBONES[name]
    net = EmbeddingNet(8, spec.blocks // 2, spec.name).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, spec.size, spec.size))
    assert out.shape == (1, 8) and abs(float(out.norm()) - 1.0) < 1e-5
    assert sum(p.requires_grad for p in net.backbone._blocks[0].parameters()) == 0


def test_augment_is_deterministic_and_sized() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8))
    a = shelf_augment(img, 64, np.random.default_rng(7))
    b = shelf_augment(img, 64, np.random.default_rng(7))
    assert a.size == (64, 64) and a.mode == "RGB" and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("backbone", ["lite0", "lite1"])
def test_train_resume_and_export(tmp_path: Path, catalogue: Path, backbone: str) -> None:
    spec = BACKBONES[backbone]
    cfg = TrainConfig(
        backbone=spec.name,
        catalogue=catalogue,
        images_root=catalogue.parent,
        out_dir=tmp_path / "run",
        val_queries=catalogue,  # tiny fixture: only checks that validation runs and is recorded
        epochs=1,
        P=3,
        K=2,
        train_size=64,
        dim=16,
        steps_per_epoch=1,
        threads=1,
    )
    state = train(cfg)
    assert [h["epoch"] for h in state["history"]] == [1] and "recall@1" in state["history"][0]
    cfg.epochs = 2
    state = train(cfg)  # resumes from last.pt: runs epoch 2 only
    assert [h["epoch"] for h in state["history"]] == [1, 2]

    from app.offline.export.export_model import export_checkpoint

    card = export_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "model", "tiny-trained")
    assert card.output.dim == 16
    assert card.model_dump()["training"]["loss"] == "ms"
    assert (card.input.size, card.input.resize_to) == (spec.size, spec.eval_input.resize_to)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["config"]["freeze_blocks"] == spec.blocks // 2 and ckpt["config"]["backbone"] == backbone
    net = EmbeddingNet(16, spec.blocks // 2, spec.name)
    net.load_state_dict(ckpt["model"])
    net.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, spec.size, spec.size)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = OnnxEmbedder(tmp_path / "model").embed(x)
    assert np.abs(got - expected).max() < 1e-4


def test_training_takes_mined_pairs(tmp_path: Path, catalogue: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("anchor,sku,negative_sku\nimg/white-milk_0.jpg,white-milk,blue-milk\n")
    cfg = TrainConfig(
        catalogue=catalogue,
        images_root=catalogue.parent,
        out_dir=tmp_path / "run",
        val_queries=catalogue,
        hard_negatives=pairs,
        hard_share=0.5,  # the pair batches, opt-in since they measured no gain (docs/capture.md)
        epochs=1,
        P=4,
        K=2,
        train_size=64,
        dim=16,
        steps_per_epoch=2,
        threads=1,
    )
    state = train(cfg)
    assert state["history"][0]["epoch"] == 1 and np.isfinite(state["history"][0]["loss"])
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["state"]["epoch"] == 1
