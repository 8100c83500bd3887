"""Test helpers: a tiny real ONNX model, synthetic product photos, a tiny catalogue, a live uvicorn server."""

from __future__ import annotations

import io
import json
import shutil
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import uvicorn
from fastapi import FastAPI
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from app.artifacts.hashing import sha256_file
from app.engine.embedding import Embedder, ModelCard
from app.engine.imaging import Collected
from app.engine.search import SearchEngine, SearchOutcome, SearchParams
from app.offline.datasets.catalogue import write_catalogue
from app.service.config import Settings
from app.service.engines import load_engine
from app.service.lifecycle import EngineLoader

TINY_SIZE = 32
TINY_DIM = 16


def make_tiny_model(model_dir: Path, *, dim: int = TINY_DIM, seed: int = 0, name: str = "tiny") -> Path:
    """A real ONNX embedding model: Conv(4x4, stride 4) -> ReLU -> GlobalAveragePool -> Flatten."""
    model_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.normal(size=(dim, 3, 4, 4)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(scale=0.1, size=(dim,)).astype(np.float32), "B")
    nodes = [
        helper.make_node("Conv", ["images", "W", "B"], ["c"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["embedding"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, TINY_SIZE, TINY_SIZE])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(model_dir / "model.onnx"))
    card = {
        "name": name,
        "version": "0.0.1",
        "sha256": sha256_file(model_dir / "model.onnx"),
        "input": {
            "name": "images",
            "size": TINY_SIZE,
            "resize": "shorter_side_then_center_crop",
            "resize_to": TINY_SIZE,
            "mean": [127.5, 127.5, 127.5],
            "std": [64.0, 64.0, 64.0],
        },
        "output": {"name": "embedding", "dim": dim, "normalized": False},
    }
    (model_dir / "model.json").write_text(json.dumps(card, indent=2))
    return model_dir


# Three categories of two SKUs each; a SKU is a colour plus a stripe pattern, so the tiny model separates them.
SKUS: dict[str, tuple[str, tuple[int, int, int], int]] = {
    "red-apple": ("apple", (200, 30, 30), 0),
    "green-apple": ("apple", (40, 190, 40), 0),
    "blue-milk": ("milk", (30, 40, 200), 1),
    "white-milk": ("milk", (230, 230, 230), 1),
    "yellow-juice": ("juice", (230, 210, 20), 2),
    "orange-juice": ("juice", (240, 130, 10), 2),
}


def product_image(sku: str, variant: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    """A synthetic product photo: the SKU's colour, its category's stripes, mild per-variant noise."""
    _, colour, stripes = SKUS[sku]
    rng = np.random.default_rng(zlib.crc32(f"{sku}/{variant}".encode()))
    w, h = size
    arr = np.empty((h, w, 3), dtype=np.float32)
    arr[:] = colour
    if stripes == 1:
        arr[::8] *= 0.3
    elif stripes == 2:
        arr[:, ::8] *= 0.3
    arr += rng.normal(scale=6.0, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def make_catalogue(root: Path, *, per_sku: int = 3) -> Path:
    """Write catalogue images and catalogue.csv under root; returns the CSV path."""
    rows = []
    for sku, (category, _, _) in SKUS.items():
        for v in range(per_sku):
            rel = f"img/{sku}_{v}.jpg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(encode(product_image(sku, v)))
            rows.append({"sku": sku, "category": category, "image": rel, "title": sku.replace("-", " ")})
    csv_path = root / "catalogue.csv"
    write_catalogue(csv_path, rows)
    return csv_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_up(base: str, path: str = "/healthz", timeout_s: float = 30) -> bool:
    """Poll `base + path` until it answers 200 or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}{path}", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.05)
    return False


@contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """Run the app under a real uvicorn server on 127.0.0.1; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    if not wait_until_up(base):
        raise RuntimeError("server did not start")
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class GatedEngine(SearchEngine):
    """A real engine whose searches wait for a gate: holds a request in flight for as long as a test needs."""

    def __init__(self, gate: threading.Event, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.gate = gate

    def search_image(self, data: bytes, params: SearchParams, warnings: Collected | None = None) -> SearchOutcome:
        self.gate.wait(10)
        return super().search_image(data, params, warnings)


def gated_loader(
    gate: threading.Event, *, embedder: Embedder | None = None, engine: type[GatedEngine] = GatedEngine
) -> EngineLoader:
    """An engine loader (create_app's port) whose engines (`engine`, a GatedEngine) wait for `gate` before every
    search; with `embedder`, they embed with it instead of the model the settings name."""

    def load(settings: Settings, reused: Embedder | None = None) -> SearchEngine:
        e = load_engine(settings, embedder or reused)
        return engine(
            gate,
            embedder=e.embedder,
            router=e.router,
            shards=e.shards,
            items=e.items,
            manifest=e.manifest,
            max_image_pixels=e.max_image_pixels,
            overfetch=e.overfetch,
        )

    return load


class DelegatingEmbedder:
    """A real embedder behind the Embedder port: tests subclass it and change `embed` (count, fail, slow down)."""

    def __init__(self, real: Embedder) -> None:
        self._real = real

    @property
    def card(self) -> ModelCard:
        return self._real.card

    @property
    def dim(self) -> int:
        return self._real.dim

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return self._real.preprocess(image)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return self._real.embed(batch)


def catalogue_with_lost_sku(catalogue: Path, tmp_path: Path) -> Path:
    """The test catalogue plus a SKU whose only photo is corrupt: 19 rows, 7 SKUs, 1 of them lost."""
    root = tmp_path / "cat"
    shutil.copytree(catalogue.parent, root)
    (root / "img" / "jam.jpg").write_bytes(encode(product_image("red-apple", 9))[:200])  # truncated JPEG
    csv_path = root / "catalogue.csv"
    csv_path.write_text(csv_path.read_text() + "plum-jam,jam,img/jam.jpg,Plum jam\n")
    return csv_path
