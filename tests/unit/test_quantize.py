"""Static int8 (QDQ) quantisation: a real quantised ONNX model whose embeddings stay close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.engine.embedding import OnnxEmbedder
from app.engine.imaging import decode_image
from app.offline.datasets.catalogue import read_catalogue
from app.offline.export.quantize import quantize_model


def test_int8_model_tracks_fp32(tiny_model: Path, catalogue: Path, tmp_path: Path) -> None:
    card = quantize_model(tiny_model, catalogue, catalogue.parent, tmp_path / "int8", n_images=12)
    assert card.name == "tiny-int8" and card.model_dump()["quantization"]["from_model"]["name"] == "tiny"
    fp32, int8 = OnnxEmbedder(tiny_model), OnnxEmbedder(tmp_path / "int8")  # hash checked against the new card
    rows, _ = read_catalogue(catalogue)
    x = np.stack(
        [fp32.preprocess(decode_image((catalogue.parent / r.image).read_bytes(), max_pixels=10**7)) for r in rows]
    )
    cos = (fp32.embed(x) * int8.embed(x)).sum(axis=1)
    assert cos.min() > 0.95
