"""Static int8 (QDQ) quantisation of an embedding model, calibrated on catalogue photos (needs `onnx`).

Dynamic int8 makes CNNs slower on CPU (ConvInteger); static QDQ lets ONNX Runtime fuse int8 convolutions. Whether
the result is faster, and what it costs in recall, is measured by scripts/compare_models.py, never assumed."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from app.artifacts.hashing import sha256_file
from app.engine.embedding import ModelCard
from app.offline.datasets.catalogue import read_catalogue
from app.offline.datasets.images import model_input, read_photo

log = logging.getLogger(__name__)


class _PhotoReader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self._input = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self._input: batch}


def quantize_model(
    model_dir: Path, calibration_csv: Path, images_root: Path, out_dir: Path, *, n_images: int = 256, seed: int = 0
) -> ModelCard:
    card = ModelCard.load(model_dir)
    rows, _ = read_catalogue(calibration_csv)
    rng = np.random.default_rng(seed)
    chosen = [rows[i] for i in sorted(rng.choice(len(rows), size=min(n_images, len(rows)), replace=False))]
    arrays = [model_input(read_photo(images_root, r.image), card.input) for r in chosen]
    batches = [np.stack(arrays[i : i + 16]) for i in range(0, len(arrays), 16)]

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_dir / card.file), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(out_dir / "model.onnx"),
            _PhotoReader(batches, card.input.name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    data = card.model_dump()
    data.update(
        name=f"{card.name}-int8",
        sha256=sha256_file(out_dir / "model.onnx"),
        quantization={
            "method": "ONNX Runtime static, QDQ, per-channel int8 weights, uint8 activations, MinMax calibration",
            "calibration": f"{len(chosen)} photos from {calibration_csv.name} (seed {seed})",
            "from_model": {"name": card.name, "sha256": card.sha256},
        },
    )
    (out_dir / "model.json").write_text(json.dumps(data, indent=2) + "\n")
    licence = model_dir / "LICENSE"
    if licence.exists():
        shutil.copyfile(licence, out_dir / "LICENSE")
    if card.training_images is not None:  # the same training photos: builds must know them too
        shutil.copyfile(model_dir / card.training_images, out_dir / card.training_images)
    log.info("quantised", extra={"out": str(out_dir)})
    return ModelCard.model_validate(data)
