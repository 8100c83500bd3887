"""Metric-learning pieces: losses, P x K sampler, augmentations, and a tiny train -> resume -> export run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")

from app.engine.embedding import OnnxEmbedder  # noqa: E402
from app.offline.train.augment import shelf_augment  # noqa: E402
from app.offline.train.train_embedding import (  # noqa: E402
    BatchHardTripletLoss,
    EmbeddingNet,
    MultiSimilarityLoss,
    ProxyAnchorLoss,
    TrainConfig,
    pk_batches,
    train,
)

pytestmark = pytest.mark.train


def _embeddings(separated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(4)
    centres = torch.eye(8)[:4]
    noise = torch.randn(16, 8, generator=g) * (0.05 if separated else 1.0)
    emb = (centres[labels] if separated else torch.zeros(16, 8)) + noise
    return torch.nn.functional.normalize(emb, dim=1), labels


@pytest.mark.parametrize("loss", [MultiSimilarityLoss(), BatchHardTripletLoss(), ProxyAnchorLoss(4, 8)])
def test_losses_prefer_separated_classes(loss: torch.nn.Module) -> None:
    if isinstance(loss, ProxyAnchorLoss):
        with torch.no_grad():
            loss.proxies.copy_(torch.eye(8)[:4])
    good, bad = loss(*_embeddings(True)), loss(*_embeddings(False))
    assert float(good) < float(bad)
    emb, labels = _embeddings(False)
    emb.requires_grad_(True)
    loss(emb, labels).backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_triplet_is_zero_beyond_the_margin() -> None:
    assert float(BatchHardTripletLoss(margin=0.2)(*_embeddings(True))) == 0.0


def test_pk_batches_are_class_balanced() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7 + [3] * 5)
    batches = pk_batches(labels, P=3, K=4, n_batches=20, rng=np.random.default_rng(0))
    for b in batches:
        classes, counts = np.unique(labels[b], return_counts=True)
        assert len(classes) == 3 and (counts == 4).all()


def test_augment_is_deterministic_and_sized() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 90, 3), dtype=np.uint8))
    a = shelf_augment(img, 64, np.random.default_rng(7))
    b = shelf_augment(img, 64, np.random.default_rng(7))
    assert a.size == (64, 64) and a.mode == "RGB" and a.tobytes() == b.tobytes()


def test_train_resume_and_export(tmp_path: Path, catalogue: Path) -> None:
    cfg = TrainConfig(
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
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    net = EmbeddingNet(16, cfg.freeze_blocks)
    net.load_state_dict(ckpt["model"])
    net.eval()
    x = np.random.default_rng(0).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = OnnxEmbedder(tmp_path / "model").embed(x)
    assert np.abs(got - expected).max() < 1e-4
