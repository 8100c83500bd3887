"""Static int8 (QDQ) quantisation: a real quantised ONNX model whose embeddings stay close to fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from app.engine.embedding import OnnxEmbedder
from app.engine.imaging import decode_image
from app.offline.datasets.catalogue import read_catalogue
from app.offline.export.quantize import quantize_model
from app.service.config import SHIPPED_MODEL_DIR


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


def _int8_weights(model: Path) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model)).graph
    weights = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}  # not the zero points
    return [
        numpy_helper.to_array(t)
        for t in graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.name in weights
    ]


def test_int8_weights_stay_within_64_by_default(tiny_model: Path, catalogue: Path, tmp_path: Path) -> None:
    """uint8 x int8 pairs summed in int16 (VPMADDUBSW, CPUs without VNNI) saturate past 32767: 255 x 127 x 2 does,
    255 x 64 x 2 = 32640 does not. The default keeps every weight in [-64, 64]; --full-range uses all 8 bits."""
    card = quantize_model(tiny_model, catalogue, catalogue.parent, tmp_path / "rr", n_images=12)
    assert card.model_dump()["quantization"]["reduce_range"] is True
    weights = _int8_weights(tmp_path / "rr" / "model.onnx")
    assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights)

    quantize_model(tiny_model, catalogue, catalogue.parent, tmp_path / "full", n_images=12, reduce_range=False)
    full = _int8_weights(tmp_path / "full" / "model.onnx")
    assert max(int(np.abs(w).max()) for w in full) > 64


def test_the_default_model_has_7_bit_weights() -> None:
    weights = _int8_weights(SHIPPED_MODEL_DIR / "model.onnx")
    assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights)
