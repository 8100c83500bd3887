"""The committed models load, match their cards (hash, dim) and give unit vectors; no torch needed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.engine.embedding import OnnxEmbedder


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("efficientnet-lite0-imagenet", 1280),
        ("grocery-lite0-ms512", 512),
        ("grocery-lite0-ms512-int8", 512),
        ("grocery-lite0-ms512-cat", 512),
        ("grocery-lite1-ms512", 512),
        ("grocery-lite1-ms512-int8", 512),
        ("grocery-lite1-ms512-sp", 512),
        ("grocery-lite1-ms512-sp-int8", 512),
        ("grocery-lite1-ms512-sp20", 512),
        ("grocery-lite1-ms512-sp208-int8", 512),
    ],
)
def test_committed_models_match_their_cards(name: str, dim: int) -> None:
    model_dir = Path(__file__).resolve().parents[2] / "models" / name
    embedder = OnnxEmbedder(model_dir)  # checks the hash and output dim against model.json
    assert embedder.dim == dim
    side = embedder.card.input.size  # 224 for Lite0, 240 for Lite1
    x = np.zeros((2, 3, side, side), dtype=np.float32)
    assert np.allclose(np.linalg.norm(embedder.embed(x), axis=1), 1.0, atol=1e-5)


def test_the_default_model_is_the_trained_one() -> None:
    from app.service.config import Settings

    assert Settings().model_dir.name == "grocery-lite1-ms512-sp208-int8"


def test_int8_cards_keep_the_fp32_figures_apart() -> None:
    """An int8 card's own figures are its own measurements; what it was quantised from is under fp32_model."""
    for card in (Path(__file__).resolve().parents[2] / "models").glob("*-int8/model.json"):
        evaluation = json.loads(card.read_text())["evaluation"]
        assert "train_catalogue" not in evaluation and "fp32_model" in evaluation, card
