"""Data test on the shared GroceryStoreDataset: the committed model, an index of every train photo, and the val
photos as queries through the HTTP API. Photos inside one split are burst shots, so only cross-split counts."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from app.main import create_app
from app.pipeline.build_index import BuildOptions, build_index
from app.pipeline.catalogue import write_catalogue
from app.pipeline.grocery import split_rows
from tests.helpers import live_server

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "efficientnet-lite0-imagenet"

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def train_index(dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("grocery")
    write_catalogue(tmp / "train.csv", split_rows(dataset_dir, "train"))
    result = build_index(tmp / "train.csv", dataset_dir, tmp / "index", MODEL_DIR, BuildOptions(progress=False))
    assert result.problems == [] and result.manifest.n_items == 2640
    return tmp / "index"


@pytest.fixture(scope="module")
def server(train_index: Path) -> Iterator[str]:
    settings = Settings(index_dir=train_index, model_dir=MODEL_DIR, pool_threads=2)
    with live_server(create_app(settings)) as base:
        yield base


def test_val_queries_through_http(server: str, dataset_dir: Path, measured: dict[str, object]) -> None:
    queries = split_rows(dataset_dir, "val")
    assert len(queries) == 296

    def ask(row: dict[str, str]) -> tuple[dict[str, str], dict]:  # type: ignore[type-arg]
        data = (dataset_dir / row["image"]).read_bytes()
        r = httpx.post(f"{server}/search", files={"image": ("q.jpg", data, "image/jpeg")}, params={"k": 5}, timeout=60)
        assert r.status_code == 200, r.text
        return row, r.json()

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, queries))
    hits1 = sum(body["results"][0]["sku"] == row["sku"] for row, body in answers)
    hits5 = sum(row["sku"] in [x["sku"] for x in body["results"]] for row, body in answers)
    router1 = sum(body["routing"]["probed"][0]["category"] == row["category"] for row, body in answers)
    probes = sum(len(body["routing"]["probed"]) for _, body in answers) / len(answers)
    r1, r5 = hits1 / len(answers), hits5 / len(answers)
    measured["frozen model, train catalogue, val queries (HTTP)"] = (
        f"SKU recall@1={r1:.3f} recall@5={r5:.3f} router top-1={router1 / len(answers):.3f} shards/query={probes:.2f}"
    )
    assert r1 >= 0.55
    assert r5 >= 0.85
