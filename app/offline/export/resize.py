"""Serve an exported embedding model at another input size: the same ONNX graph and weights, a new fixed H x W in
the graph's input and the card (needs `onnx`).

Why not re-export: a model's checkpoint is often gone (the committed models ship without theirs), and the
EfficientNet-Lite graphs hold no constant that depends on the input size (static "same" padding, global average
pooling). tests/unit/test_resize_model.py checks this: a Lite0 export resized to 192 px gives exactly the output of
a torch export at 192. Smaller inputs are cheaper: grocery-lite1-ms512-sp at 208 px (its training size) instead of
240 costs 2.7 points of recall@1 on val for a faster model (docs/training.md); the resize is measured, never
assumed to be free.

A graph that does depend on its input size fails here, when ONNX Runtime first runs it at the new size, or gives
other answers: measure the result (scripts/compare_models.py) before serving it."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from app.artifacts.hashing import sha256_file
from app.engine.embedding import ModelCard
from app.errors import ArtifactError

log = logging.getLogger(__name__)


def resize_model(model_dir: Path, out_dir: Path, size: int, name: str | None = None) -> ModelCard:
    """Write `out_dir`: `model_dir`'s model with input `size` x `size`, the resize-before-crop scaled in
    proportion, and a card naming the source. The source's figures move under `evaluation.source_model` until
    this model is measured (scripts/compare_models.py --record). Nothing is written unless the result runs: it is
    made in a scratch directory beside `out_dir` and renamed into place."""
    card = _source_card(model_dir, out_dir)
    graph = _load(model_dir / card.file)
    old = card.input.size
    _set_input_side(graph, card.input.name, size)
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        scratch = Path(tmp) / "model"
        scratch.mkdir()
        onnx.save(graph, str(scratch / card.file))
        _check_runs(scratch / card.file, card.input.name, size, card.output.dim)
        data = card.model_dump()
        data["input"]["size"] = size
        data["input"]["resize_to"] = round(card.input.resize_to * size / old)
        data.update(
            name=name or out_dir.name,
            sha256=sha256_file(scratch / card.file),
            evaluation={"source_model": card.evaluation} if card.evaluation else {},
            resized={"from_model": {"name": card.name, "sha256": card.sha256}, "input_size": [old, size]},
        )
        (scratch / "model.json").write_text(json.dumps(data, indent=2) + "\n")
        for extra in ("LICENSE", card.training_images):  # the same weights were trained on the same photos
            if extra is not None and (model_dir / extra).exists():
                shutil.copyfile(model_dir / extra, scratch / extra)
        scratch.rename(out_dir)  # onto a missing or empty directory only (checked first)
    log.info("resized", extra={"out": str(out_dir), "from": old, "to": size})
    return ModelCard.model_validate(data)


def _source_card(model_dir: Path, out_dir: Path) -> ModelCard:
    """The source's card, checked: its file matches it, its training-images file is there, and the output is
    a new or empty directory (writing over the source would lose it)."""
    if out_dir.resolve() == model_dir.resolve():
        raise ArtifactError(f"--out {out_dir} is the source model: write the resized model elsewhere")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ArtifactError(f"--out {out_dir} exists and is not an empty directory: remove it or choose another")
    card = ModelCard.load(model_dir)
    path = model_dir / card.file
    if not path.is_file() or sha256_file(path) != card.sha256:
        raise ArtifactError(f"model file {path} is missing or does not match the sha256 in its model.json")
    if card.training_images is not None and not (model_dir / card.training_images).is_file():
        raise ArtifactError(f"model card {model_dir / 'model.json'}: {card.training_images} is missing")
    return card


def _load(path: Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors: the file is not a model
        raise ArtifactError(f"{path} is not a readable ONNX model") from exc


def _set_input_side(graph: onnx.ModelProto, input_name: str, size: int) -> None:
    """The NCHW input's H and W become `size`; inferred intermediate shapes are dropped (they were the old
    size's) and ONNX Runtime infers them again."""
    inputs = [i for i in graph.graph.input if i.name == input_name]
    if not inputs:
        raise ArtifactError(f"the model has no input named {input_name!r}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ArtifactError(f"input {input_name!r} is not NCHW with 3 channels (rank {len(dims)})")
    if any(d.dim_param for d in dims[2:]):
        # A graph already free in H and W needs no resize; freezing it here would only hide that.
        raise ArtifactError(f"input {input_name!r} has no fixed height and width: set the size in its card only")
    dims[2].dim_value = size
    dims[3].dim_value = size
    del graph.graph.value_info[:]


def _check_runs(path: Path, input_name: str, size: int, dim: int) -> None:
    try:  # a size-dependent graph fails at load (shape inference) or at the first run
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out,) = session.run(None, {input_name: np.zeros((1, 3, size, size), np.float32)})
    except Exception as exc:  # ONNX Runtime raises its own exception types, untyped here
        raise ArtifactError(f"the model does not run at {size} px: its graph depends on the input size") from exc
    if out.shape != (1, dim):
        raise ArtifactError(f"at {size} px the model's output is {out.shape}, not (1, {dim})")
