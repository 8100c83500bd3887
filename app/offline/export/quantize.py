"""Static int8 (QDQ) quantisation of an embedding model, calibrated on catalogue photos (needs `onnx`).

Dynamic int8 makes CNNs slower on CPU (ConvInteger); static QDQ lets ONNX Runtime fuse int8 convolutions. Whether
the result is faster, and what it costs in recall, is measured by scripts/compare_models.py, never assumed.

The recipe, measured on the grocery val photos (docs/training.md#int8): per-channel int8 weights; activation
ranges from the 99.999th percentile of a histogram instead of the extremes (MinMax lost 2.7 points of recall@1 on
Lite0, percentile 1.7); the first 4 MBConv blocks and everything after the head convolution (pooling,
projection, normalisation) left in float. Percentile calibration keeps every activation of every calibration
photo in memory: 256 photos of Lite1 at 240 px took more than 21 GB, 128 fit.

Weights are 7-bit (`reduce_range`, -64..64) by default. The 8-bit default model (grocery-lite1-ms512-sp208-int8
1.0.0) measured val recall@1 0.848 on one machine (AMD EPYC, AVX-512 VNNI) and 0.821 in a CI run on another (its
CPU not recorded), same commit and wheels, while every fp32 model measured the same to three decimals on both.
The likely cause, documented by ONNX Runtime: without VNNI its uint8 x int8 kernel (VPMADDUBSW) sums pairs of
products in a saturating int16, and 255 x 127 x 2 > 32767; 255 x 64 x 2 = 32640 fits, so 7-bit weights avoid that
saturation. Not measured on a CPU without VNNI (none was available)."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

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
from app.offline.datasets.catalogue import CatalogueRow, read_catalogue
from app.offline.datasets.images import model_input, read_photo

log = logging.getLogger(__name__)


class _PhotoReader(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, batches: list[np.ndarray], input_name: str) -> None:
        self._it: Iterator[np.ndarray] = iter(batches)
        self._input = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._it, None)
        return None if batch is None else {self._input: batch}


CalibrationName = Literal["minmax", "percentile", "entropy"]
_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}
FLOAT_BLOCKS = 4


def float_nodes(model_path: Path, float_blocks: int) -> list[str]:
    """Nodes left in float: the convolutions of the first `float_blocks` MBConv blocks, and every node after
    the head convolution (EfficientNet-Lite as exported here: `/_blocks.N/...`, `/_conv_head/Conv`)."""
    import onnx

    nodes = onnx.load(str(model_path)).graph.node
    names = [n.name for n in nodes]
    if "/_conv_head/Conv" not in names:
        log.warning("no EfficientNet-Lite node names: every node is quantised", extra={"model": str(model_path)})
        return []
    tail = names[names.index("/_conv_head/Conv") + 1 :]
    early = [
        n.name
        for n in nodes
        if n.op_type == "Conv" and any(n.name.startswith(f"/_blocks.{b}/") for b in range(float_blocks))
    ]
    return early + tail


def _calibration_batches(
    card: ModelCard, calibration_csv: Path, images_root: Path, n_images: int, seed: int
) -> tuple[list[CatalogueRow], list[np.ndarray]]:
    """A seeded sample of the catalogue's photos, as the model's input, in batches of 16."""
    rows, _ = read_catalogue(calibration_csv)
    rng = np.random.default_rng(seed)
    chosen = [rows[i] for i in sorted(rng.choice(len(rows), size=min(n_images, len(rows)), replace=False))]
    arrays = [model_input(read_photo(images_root, r.image), card.input) for r in chosen]
    return chosen, [np.stack(arrays[i : i + 16]) for i in range(0, len(arrays), 16)]


def quantize_model(
    model_dir: Path,
    calibration_csv: Path,
    images_root: Path,
    out_dir: Path,
    *,
    n_images: int = 128,
    seed: int = 0,
    method: CalibrationName = "percentile",
    float_blocks: int = FLOAT_BLOCKS,
    reduce_range: bool = True,
) -> ModelCard:
    card = ModelCard.load(model_dir)
    chosen, batches = _calibration_batches(card, calibration_csv, images_root, n_images, seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model_dir / card.file), str(prepared), skip_symbolic_shape=True)
        excluded = float_nodes(prepared, float_blocks)  # the names in the graph that is quantised
        quantize_static(
            str(prepared),
            str(out_dir / "model.onnx"),
            _PhotoReader(batches, card.input.name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            reduce_range=reduce_range,
            calibrate_method=_METHODS[method],
            nodes_to_exclude=excluded,
            extra_options={"CalibPercentile": 99.999} if method == "percentile" else {},
        )
    data = card.model_dump()
    data.update(
        name=f"{card.name}-int8",
        # The fp32 model's figures are not this model's: kept apart until this one is measured
        # (scripts/compare_models.py --record, scripts/record_training_images.py).
        evaluation={"fp32_model": card.evaluation} if card.evaluation else {},
        sha256=sha256_file(out_dir / "model.onnx"),
        quantization={
            "method": f"ONNX Runtime static, QDQ, per-channel int8 weights, uint8 activations, {method} calibration"
            + (" (99.999th percentile)" if method == "percentile" else "")
            + (", 7-bit weights (reduce_range)" if reduce_range else ""),
            "reduce_range": reduce_range,
            "float": f"the first {float_blocks} MBConv blocks and everything after the head convolution"
            if excluded
            else "nothing",
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
