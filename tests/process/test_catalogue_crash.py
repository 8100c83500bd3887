"""A 2xx on a catalogue write survives kill -9: `vps serve` is killed with SIGKILL at random points of a stream of
writes, 20 times on each database; after every restart each acknowledged change is there, no request is half
applied (a two-image request left both images or neither), and the index loads and verifies."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.helpers import encode, free_port

VPS = str(Path(sys.executable).with_name("vps"))
TOKEN = "crash-test-token"  # noqa: S105 - test credential
AUTH = {"authorization": f"Bearer {TOKEN}"}
KILLS = 20


def _image(n: int) -> bytes:
    rng = np.random.default_rng(n)
    colour = rng.integers(0, 255, size=3)
    arr = np.clip(colour + rng.normal(scale=8, size=(64, 64, 3)), 0, 255).astype(np.uint8)
    return encode(Image.fromarray(arr, "RGB"))


@dataclass
class Acked:
    """What the server acknowledged: products by SKU (title), and image requests (SKU, the two ids)."""

    products: dict[str, str] = field(default_factory=dict)
    images: list[tuple[str, list[str]]] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)  # SKUs a request was sent for, acknowledged or not


def _serve(index: Path, model: Path, url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "VPS_INDEX_DIR": str(index), "VPS_MODEL_DIR": str(model), "VPS_WARMUP_QUERIES": "0",
           "VPS_LOG_LEVEL": "WARNING", "VPS_ADMIN_TOKEN": TOKEN, "VPS_CATALOGUE_URL": url}  # fmt: skip
    proc = subprocess.Popen([VPS, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        assert proc.poll() is None, f"vps serve exited {proc.returncode}"
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("vps serve did not become ready")


def _writer(base: str, round_: int, acked: Acked, stop: threading.Event) -> None:
    """PUT a product, then POST two images to it, again and again until the server dies (bounded: 200 SKUs)."""
    with httpx.Client(base_url=base, headers=AUTH, timeout=5) as client:
        for i in range(200):
            if stop.is_set():
                return
            sku, title = f"r{round_}-s{i}", f"title {round_}/{i}"
            acked.tried.add(sku)
            try:
                r = client.put(f"/v1/products/{sku}", json={"category": f"c{i % 3}", "title": title})
                if r.status_code != 200:
                    return
                acked.products[sku] = title
                n = 1000 * round_ + 2 * i
                files = [
                    ("image", ("a.jpg", _image(n), "image/jpeg")),
                    ("image", ("b.jpg", _image(n + 1), "image/jpeg")),
                ]
                r = client.post(f"/v1/products/{sku}/images", files=files)
                if r.status_code != 201:
                    return
                acked.images.append((sku, r.json()["image_ids"]))
            except httpx.TransportError:
                return  # killed mid-request: this one's outcome is unknown


def _check(base: str, acked: Acked) -> None:
    with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
        for sku, title in acked.products.items():
            r = client.get(f"/v1/products/{sku}")
            assert r.status_code == 200, f"acknowledged product {sku} lost"
            assert r.json()["title"] == title
        for sku, ids in acked.images:
            got = [i["image_id"] for i in client.get(f"/v1/products/{sku}").json()["images"]]
            assert got == ids, f"acknowledged images of {sku} lost: {got} != {ids}"
        for sku in acked.tried:
            r = client.get(f"/v1/products/{sku}")
            if r.status_code == 200:
                assert len(r.json()["images"]) in (0, 2), f"{sku}: a two-image request half applied"


def test_acknowledged_writes_survive_kill_9(catalogue_index: Path, tiny_model: Path, catalogue_url: str) -> None:
    rng = random.Random(14)  # noqa: S311 - kill times, not secrets
    acked = Acked()
    for round_ in range(KILLS):
        proc, base = _serve(catalogue_index, tiny_model, catalogue_url)
        try:
            _check(base, acked)  # everything acknowledged before the last kill
            stop = threading.Event()
            writer = threading.Thread(target=_writer, args=(base, round_, acked, stop), daemon=True)
            writer.start()
            time.sleep(rng.uniform(0.02, 0.5))  # a random point of the stream
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            stop.set()
            writer.join(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    proc, base = _serve(catalogue_index, tiny_model, catalogue_url)
    try:
        _check(base, acked)
        assert httpx.get(f"{base}/readyz").status_code == 200  # the index loads and verifies after all that
        assert len(acked.products) >= KILLS, "too few writes were acknowledged to show anything"
    finally:
        proc.kill()
        proc.wait(timeout=10)
