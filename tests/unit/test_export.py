"""The exported ONNX embedding model matches PyTorch (needs the `train` extra, which `make test` installs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.engine.embedding import OnnxEmbedder

torch = pytest.importorskip("torch", reason="the train extra (torch) is not installed")


def test_onnx_matches_pytorch(tmp_path: Path) -> None:
    from app.offline.export.export_model import build_imagenet_lite0, export_imagenet_model

    card = export_imagenet_model(tmp_path / "m")
    assert card.output.dim == 1280 and card.output.normalized
    x = np.random.default_rng(0).normal(size=(3, 3, 224, 224)).astype(np.float32)  # batch of 3: dynamic axis
    with torch.no_grad():
        expected = build_imagenet_lite0()(torch.from_numpy(x)).numpy()
    got = OnnxEmbedder(tmp_path / "m").embed(x)
    assert got.shape == (3, 1280)
    assert np.abs(got - expected).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
