"""`vps resize-model`: a model served at another input size is the same model at that size, or is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from app.artifacts.hashing import sha256_file
from app.engine.embedding import OnnxEmbedder
from app.errors import ArtifactError
from app.offline.export.resize import resize_model


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})
    return np.asarray(out)


@pytest.fixture(scope="module")
def lite0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    from app.offline.export.export_model import export_imagenet_model

    out = tmp_path_factory.mktemp("lite0") / "m"
    export_imagenet_model(out)
    return out


@pytest.mark.parametrize("size", [192, 200])  # 200: odd feature maps (25, 13) where 224 has even ones (28, 14)
def test_resized_export_equals_a_fresh_export_at_that_size(lite0: Path, tmp_path: Path, size: int) -> None:
    from app.offline.export.export_model import build_imagenet_lite0, export_onnx

    resize_model(lite0, tmp_path / "r", size)
    export_onnx(build_imagenet_lite0(), tmp_path / "fresh.onnx", size)
    x = np.random.default_rng(size).normal(size=(2, 3, size, size)).astype(np.float32)
    resized, fresh = (_run(path, x) for path in (tmp_path / "r" / "model.onnx", tmp_path / "fresh.onnx"))
    assert resized.shape == (2, 1280)
    assert np.abs(resized - fresh).max() < 1e-6
    import torch

    with torch.no_grad():
        expected = build_imagenet_lite0()(torch.from_numpy(x)).numpy()
    assert np.abs(resized - expected).max() < 1e-4


def test_card_names_the_source_and_scales_the_resize(lite0: Path, tmp_path: Path) -> None:
    source = json.loads((lite0 / "model.json").read_text())
    card = resize_model(lite0, tmp_path / "r", 192, name="lite0-192")
    written = json.loads((tmp_path / "r" / "model.json").read_text())
    assert card.name == written["name"] == "lite0-192"
    assert written["input"]["size"] == 192
    assert written["input"]["resize_to"] == round(source["input"]["resize_to"] * 192 / source["input"]["size"])
    assert written["resized"] == {
        "from_model": {"name": source["name"], "sha256": source["sha256"]},
        "input_size": [source["input"]["size"], 192],
    }
    assert written["sha256"] == sha256_file(tmp_path / "r" / "model.onnx") != source["sha256"]
    assert written["evaluation"] == ({"source_model": source["evaluation"]} if source.get("evaluation") else {})


def _tiny_model(tmp: Path, input_shape: list[int | str], reshape_to: list[int] | None) -> Path:
    """A real ONNX model and card: global average pool to (batch, 3), or a Reshape fixed to the export's size."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, None)
    if reshape_to is None:
        nodes = [
            helper.make_node("GlobalAveragePool", ["images"], ["p"]),
            helper.make_node("Flatten", ["p"], ["embedding"]),
        ]
        inits = []
    else:
        nodes = [helper.make_node("Reshape", ["images", "shape"], ["embedding"])]
        inits = [helper.make_tensor("shape", TensorProto.INT64, [len(reshape_to)], reshape_to)]
    graph = helper.make_graph(nodes, "tiny", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    tmp.mkdir(parents=True)
    onnx.save(model, str(tmp / "model.onnx"))
    dim = 3 if reshape_to is None else reshape_to[-1]
    card = {
        "name": "tiny",
        "version": "1",
        "sha256": sha256_file(tmp / "model.onnx"),
        "input": {"name": "images", "size": 16, "resize_to": 16, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "output": {"name": "embedding", "dim": dim, "normalized": False},
    }
    (tmp / "model.json").write_text(json.dumps(card))
    return tmp


def test_a_graph_fixed_to_its_input_size_is_refused(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "fixed", [1, 3, 16, 16], reshape_to=[1, 3 * 16 * 16])
    with pytest.raises(ArtifactError, match="does not run at 24 px"):
        resize_model(model, tmp_path / "r", 24)
    assert not (tmp_path / "r").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["fixed"]  # nor any scratch directory left


def test_an_input_that_is_not_nchw_is_refused(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "flat", [1, 3, 16], reshape_to=None)
    with pytest.raises(ArtifactError, match="not NCHW"):
        resize_model(model, tmp_path / "r", 24)


def test_a_size_free_graph_runs_at_the_new_size(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "pool", [1, 3, 16, 16], reshape_to=None)
    card = resize_model(model, tmp_path / "r", 24)
    assert card.input.size == 24
    x = np.full((1, 3, 24, 24), 2.0, np.float32)
    assert _run(tmp_path / "r" / "model.onnx", x).tolist() == [[2.0, 2.0, 2.0]]
    assert OnnxEmbedder(tmp_path / "r").dim == 3  # the card still matches its file


def test_writing_over_the_source_or_a_full_directory_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "pool", [1, 3, 16, 16], reshape_to=None)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    with pytest.raises(ArtifactError, match="is the source model"):
        resize_model(model, model, 24)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an empty directory"):
        resize_model(model, tmp_path / "full", 24)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_a_card_that_does_not_match_its_file_is_refused(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "pool", [1, 3, 16, 16], reshape_to=None)
    card = json.loads((model / "model.json").read_text())
    card["sha256"] = "0" * 64
    (model / "model.json").write_text(json.dumps(card))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        resize_model(model, tmp_path / "r", 24)


def test_an_input_with_free_height_and_width_is_refused(tmp_path: Path) -> None:
    model = _tiny_model(tmp_path / "free", [1, 3, "h", "w"], reshape_to=None)
    with pytest.raises(ArtifactError, match="no fixed height and width"):
        resize_model(model, tmp_path / "r", 24)
