"""Image embedding: preprocessing driven by the model card, ONNX Runtime inference, L2 normalisation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import onnxruntime as ort
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from app.artifacts.hashing import sha256_file
from app.errors import ArtifactError, InternalError


class ModelInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    layout: Literal["NCHW"] = "NCHW"
    size: int = Field(gt=0, description="Square input side in pixels")
    resize: Literal["shorter_side_then_center_crop", "stretch"] = "shorter_side_then_center_crop"
    resize_to: int = Field(gt=0, description="Shorter side after resizing, before the centre crop")
    mean: tuple[float, float, float] = Field(description="Per-channel mean in 0-255 pixel units")
    std: tuple[float, float, float] = Field(description="Per-channel std in 0-255 pixel units")
    colour_order: Literal["RGB", "BGR"] = "RGB"


class ModelOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dim: int = Field(gt=0)
    normalized: bool


class ModelCard(BaseModel):
    """`models/<name>/model.json`: what the service needs to use a model, and what it was released with."""

    model_config = ConfigDict(extra="allow")
    name: str
    version: str
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    file: str = "model.onnx"
    input: ModelInput
    output: ModelOutput
    metric: Literal["cosine"] = "cosine"
    trained_on: str = ""
    evaluation: dict[str, Any] = Field(default_factory=dict)
    # A file in the model directory with the sha256 of every image the model was trained on, one per line: a
    # build whose photos the model was trained on says that its held-out measurements flatter.
    training_images: str | None = None

    def training_digests(self, model_dir: Path) -> frozenset[str]:
        if self.training_images is None:
            return frozenset()
        path = model_dir / self.training_images
        try:
            return frozenset(line.strip() for line in path.read_text().splitlines() if line.strip())
        except OSError as exc:
            raise ArtifactError(f"model card {model_dir / 'model.json'}: cannot read {path}") from exc

    def unseen_router_top1(self) -> float | None:
        """The router top-1 the card records on photos the model never saw (its training images as catalogue)."""
        value = self.evaluation.get("router_unseen", {}).get("top1")
        return float(value) if isinstance(value, int | float) else None

    @classmethod
    def load(cls, model_dir: Path) -> ModelCard:
        path = model_dir / "model.json"
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise ArtifactError(f"model card missing: {path}") from exc
        except ValueError as exc:
            raise ArtifactError(f"model card invalid: {path}: {exc}") from exc


def preprocess(image: Image.Image, spec: ModelInput) -> np.ndarray:
    """RGB PIL image -> float32 CHW array as the model card prescribes."""
    size = spec.size
    if spec.resize == "stretch":
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    else:
        w, h = image.size
        if max(w, h) > 2 * min(w, h):
            # Only the central square survives the final crop. Cut an extreme shape (1 x 20000) down first, or
            # scaling its short side up to resize_to would allocate resize_to x (resize_to * aspect) pixels.
            short = min(w, h)
            left, top = (w - short) // 2 if w > h else 0, (h - short) // 2 if h > w else 0
            image = image.crop((left, top, left + short, top + short))
            w, h = image.size
        scale = spec.resize_to / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32)
    if spec.colour_order == "BGR":
        arr = arr[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    out: np.ndarray = np.ascontiguousarray(((arr - mean) / std).transpose(2, 0, 1), dtype=np.float32)
    return out


def decode_side(spec: ModelInput) -> int:
    """Smallest side a decoded image needs for this preprocessing (JPEG draft mode may decode down to it)."""
    return max(spec.size, spec.resize_to) if spec.resize != "stretch" else spec.size


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = (x / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


class Embedder(Protocol):
    """Port: a batch of preprocessed images in, L2-normalised float32 vectors out."""

    @property
    def card(self) -> ModelCard: ...

    @property
    def dim(self) -> int: ...

    def preprocess(self, image: Image.Image) -> np.ndarray: ...

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxEmbedder:
    """ONNX Runtime adapter. Refuses a model whose hash or output dim disagree with its card."""

    def __init__(self, model_dir: Path, *, intra_op_threads: int = 1, inter_op_threads: int = 1) -> None:
        self._card = ModelCard.load(model_dir)
        model_path = model_dir / self._card.file
        if not model_path.is_file():
            raise ArtifactError(f"model file missing: {model_path}")
        actual = sha256_file(model_path)
        if actual != self._card.sha256:
            raise ArtifactError(
                f"model file {model_path}: sha256 expected {self._card.sha256} (model.json), got {actual}"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise ArtifactError(f"model file {model_path}: ONNX Runtime cannot load it ({exc})") from exc
        outputs = {o.name: o for o in self._session.get_outputs()}
        out = outputs.get(self._card.output.name)
        if out is None:
            raise ArtifactError(f"model file {model_path}: output {self._card.output.name!r} not found")
        out_dim = out.shape[-1]
        if isinstance(out_dim, int) and out_dim != self._card.output.dim:
            raise ArtifactError(
                f"model file {model_path}: output dim expected {self._card.output.dim} (model.json), got {out_dim}"
            )

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def dim(self) -> int:
        return self._card.output.dim

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess(image, self._card.input)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self._card.output.name], {self._card.input.name: batch})
        vectors = np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1)
        if vectors.shape[1] != self.dim:
            raise InternalError()
        if not np.isfinite(vectors).all():
            # A NaN would poison every score; fail this request loudly instead.
            raise InternalError("the model produced a non-finite embedding")
        return l2_normalize(vectors)
