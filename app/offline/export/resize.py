"""Serve an exported embedding model at another input size: the same ONNX graph and weights, a new fixed H x W in
the graph's input and the card (needs `onnx`).

Why not re-export: a model's checkpoint is often gone (the committed models ship without theirs), and the
EfficientNet-Lite graphs hold no constant that depends on the input size (static "same" padding, global average
pooling). tests/unit/test_resize_model.py checks this: a Lite0 export resized to 192 px gives exactly the output of
a torch export at 192. Smaller inputs are cheaper: grocery-lite1-ms512-sp at 208 px (its training size) instead of
240 costs 0.78x the embed time for -2.7 points of recall@1 on val (docs/training.md); the resize is measured,
never assumed to be free.

A graph that does depend on its input size fails here, when ONNX Runtime first runs it at the new size, or gives
other answers: measure the result (scripts/compare_models.py) before serving it."""

from __future__ import annotations

import json
import logging
import shutil
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
    this model is measured (scripts/compare_models.py --record)."""
    card = ModelCard.load(model_dir)
    graph = onnx.load(str(model_dir / card.file))
    _set_input_side(graph, card.input.name, size)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(out_dir / card.file))
    _check_runs(out_dir / card.file, card.input.name, size, card.output.dim)

    data = card.model_dump()
    old = card.input.size
    data["input"]["size"] = size
    data["input"]["resize_to"] = round(card.input.resize_to * size / old)
    data.update(
        name=name or out_dir.name,
        sha256=sha256_file(out_dir / card.file),
        evaluation={"source_model": card.evaluation} if card.evaluation else {},
        resized={"from_model": {"name": card.name, "sha256": card.sha256}, "input_size": [old, size]},
    )
    (out_dir / "model.json").write_text(json.dumps(data, indent=2) + "\n")
    for extra in ("LICENSE", card.training_images):  # the same weights were trained on the same photos
        if extra is not None and (model_dir / extra).exists():
            shutil.copyfile(model_dir / extra, out_dir / extra)
    log.info("resized", extra={"out": str(out_dir), "from": old, "to": size})
    return ModelCard.model_validate(data)


def _set_input_side(graph: onnx.ModelProto, input_name: str, size: int) -> None:
    """The NCHW input's H and W become `size`; inferred intermediate shapes are dropped (they were the old
    size's) and ONNX Runtime infers them again."""
    inputs = [i for i in graph.graph.input if i.name == input_name]
    if not inputs:
        raise ArtifactError(f"the model has no input named {input_name!r}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ArtifactError(f"input {input_name!r} is not NCHW (rank {len(dims)})")
    dims[2].dim_value = size
    dims[3].dim_value = size
    del graph.graph.value_info[:]


def _check_runs(path: Path, input_name: str, size: int, dim: int) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    try:
        (out,) = session.run(None, {input_name: np.zeros((1, 3, size, size), np.float32)})
    except Exception as exc:  # ONNX Runtime raises its own exception types, untyped here
        raise ArtifactError(f"the model does not run at {size} px: its graph depends on the input size") from exc
    if out.shape != (1, dim):
        raise ArtifactError(f"at {size} px the model's output is {out.shape}, not (1, {dim})")
