"""Query features over real HTTP: attribute filters, paging, batches (uvicorn on 127.0.0.1, the tiny real model,
a real faiss index built from a catalogue with attribute columns)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.offline.build.build_index import BuildOptions, build_index
from app.service.app import create_app
from app.service.config import Settings
from tests.helpers import encode, live_server, make_catalogue, product_image

BRAND = {"red-apple": "Orchard", "green-apple": "Orchard", "blue-milk": "Arla", "white-milk": "Valio",
         "yellow-juice": "Arla", "orange-juice": "Sunny"}  # fmt: skip
PRICE = {"red-apple": "1.5", "green-apple": "2", "blue-milk": "1.2", "white-milk": "1.1", "yellow-juice": "3.5",
         "orange-juice": "2.9"}  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("attrs")
    catalogue = make_catalogue(root)
    with catalogue.open() as fh:
        rows = list(csv.DictReader(fh))
    with catalogue.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*rows[0].keys(), "brand", "price"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "brand": BRAND[r["sku"]], "price": PRICE[r["sku"]]})
    out = root / "index"
    build_index(catalogue, root, out, tiny_model, BuildOptions(M=8, ef_construction=40, progress=False))
    settings = Settings(index_dir=out, model_dir=tiny_model, warmup_queries=0, open_set=False)
    with live_server(create_app(settings)) as base:
        yield base


def _photo(sku: str, variant: int = 99) -> bytes:
    return encode(product_image(sku, variant), "JPEG")


def _search(server: str, sku: str, **params: object) -> httpx.Response:
    return httpx.post(f"{server}/search", files={"image": ("q.jpg", _photo(sku), "image/jpeg")}, params=params)


def test_info_lists_the_filter_keys(server: str) -> None:
    r = httpx.get(f"{server}/v1/info")
    assert r.json()["filter_keys"] == {"category": "string", "brand": "string", "price": "number", "sku": "string"}


def test_a_filter_keeps_only_matching_skus_and_still_fills_k(server: str) -> None:
    r = _search(server, "blue-milk", k=6, filter="brand=Arla")
    assert r.status_code == 200, r.text
    skus = [x["sku"] for x in r.json()["results"]]
    assert skus[0] == "blue-milk" and set(skus) == {"blue-milk", "yellow-juice"}  # both Arla SKUs, 2 categories
    r = _search(server, "blue-milk", k=6, filter="(brand=Arla OR brand=Valio) AND price<1.2")
    assert [x["sku"] for x in r.json()["results"]] == ["white-milk"]
    r = _search(server, "red-apple", k=6, filter="category=juice AND price>=3")
    assert [x["sku"] for x in r.json()["results"]] == ["yellow-juice"]
    r = _search(server, "red-apple", k=6, filter="brand=Nobody")
    assert r.status_code == 200 and r.json()["results"] == []


@pytest.mark.parametrize(
    ("text", "code", "needle"),
    [
        ("brand=Arla AND (price<2 OR brand=Valio)", "invalid_filter", "at character 28"),
        ("colour=red", "unknown_filter_key", "unknown key 'colour' at character 1"),
        ("price<cheap", "invalid_filter", "'cheap' at character 7"),
        ("brand>A", "invalid_filter", "needs a number column"),
    ],
)
def test_bad_filters_answer_422_naming_the_position(server: str, text: str, code: str, needle: str) -> None:
    r = _search(server, "blue-milk", filter=text)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == code and needle in err["message"], err


def test_pages_are_slices_of_one_ranking(server: str) -> None:
    whole = [x["sku"] for x in _search(server, "white-milk", k=6).json()["results"]]
    pages = [[x["sku"] for x in _search(server, "white-milk", k=2, offset=o).json()["results"]] for o in (0, 2, 4)]
    assert [s for p in pages for s in p] == whole and len(whole) == 6
    assert _search(server, "white-milk", k=2, offset=6).json()["results"] == []
    r = _search(server, "white-milk", offset=500)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"


def test_a_batch_answers_each_image_in_order_and_isolates_a_bad_one(server: str) -> None:
    skus = ["orange-juice", "blue-milk", "red-apple"]
    files = [("image", (f"{s}.jpg", _photo(s), "image/jpeg")) for s in skus]
    files.insert(1, ("image", ("bad.jpg", b"\xff\xd8\xff\xe0 not a jpeg", "image/jpeg")))
    files.append(("image", ("empty.jpg", b"", "image/jpeg")))
    r = httpx.post(f"{server}/v1/search/batch", files=files, params={"k": 2, "filter": "price<3"})
    assert r.status_code == 200, r.text
    entries = r.json()["results"]
    assert [e["index"] for e in entries] == [0, 1, 2, 3, 4]
    assert entries[1]["error"]["code"] == "corrupt_image" and entries[1]["response"] is None
    assert entries[4]["error"]["code"] == "empty_body"
    for e, sku in zip([entries[0], entries[2], entries[3]], skus, strict=True):
        single = _search(server, sku, k=2, filter="price<3").json()
        assert [x["sku"] for x in e["response"]["results"]] == [x["sku"] for x in single["results"]]
        assert all(float(PRICE[x["sku"]]) < 3 for x in e["response"]["results"])
    assert entries[0]["response"]["results"][0]["sku"] == "orange-juice"


def test_a_batch_beyond_the_limit_or_with_a_bad_filter_is_refused_whole(server: str) -> None:
    files = [("image", (f"{i}.jpg", _photo("red-apple", i), "image/jpeg")) for i in range(17)]
    r = httpx.post(f"{server}/v1/search/batch", files=files)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images"
    r = httpx.post(f"{server}/v1/search/batch", files=files[:2], params={"filter": "colour=red"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_filter_key"
    r = httpx.post(f"{server}/v1/search/batch", content=_photo("red-apple"), headers={"content-type": "image/jpeg"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_image"


def test_the_schema_documents_the_new_parameters(server: str) -> None:
    doc = httpx.get(f"{server}/openapi.json").json()
    names = {p["name"] for p in doc["paths"]["/search"]["post"]["parameters"]}
    assert {"filter", "offset", "bbox", "bbox_units"} <= names
    batch = doc["paths"]["/v1/search/batch"]["post"]
    assert {p["name"] for p in batch["parameters"]} == names
    assert "BatchResponse" in str(batch["responses"]["200"])


def _two_products() -> bytes:
    """blue-milk on the left half, orange-juice on the right half of one 192x80 photo."""
    photo = Image.new("RGB", (192, 80))
    photo.paste(product_image("blue-milk", 50), (0, 0))
    photo.paste(product_image("orange-juice", 50), (96, 0))
    return encode(photo, "JPEG", quality=95)


def test_a_region_searches_that_part_of_the_photo(server: str) -> None:
    photo = _two_products()

    def top(**params: object) -> httpx.Response:
        return httpx.post(f"{server}/search", files={"image": ("q.jpg", photo, "image/jpeg")}, params=params)

    left = top(k=1, bbox="0,0,96,80").json()["results"][0]["sku"]
    right = top(k=1, bbox="96,0,192,80").json()["results"][0]["sku"]
    assert (left, right) == ("blue-milk", "orange-juice")
    assert top(k=1, bbox="0.5,0,1,1", bbox_units="fraction").json()["results"][0]["sku"] == "orange-juice"
    for bbox, units in (("0,0,200,80", "px"), ("10,10,10,20", "px"), ("0,0,1.5,1", "fraction"), ("1,2,3", "px")):
        r = top(bbox=bbox, bbox_units=units)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_bbox", (bbox, r.text)
    r = top(bbox="0,0,96,80", bbox_units="inches")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter"


def test_image_parts_count_against_the_batch_limit_whether_files_or_fields(server: str) -> None:
    fields = [("image", (None, _photo("red-apple", i))) for i in range(17)]  # no filename: plain form fields
    r = httpx.post(f"{server}/v1/search/batch", files=fields)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_images"
    mixed = [("image", ("a.jpg", _photo("red-apple"), "image/jpeg")), ("note", (None, b"hello"))]
    r = httpx.post(f"{server}/v1/search/batch", files=mixed)
    assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_a_batch_entry_is_what_search_answers(server: str) -> None:
    batch = httpx.post(f"{server}/v1/search/batch", files=[("image", ("a.jpg", _photo("blue-milk"), "image/jpeg"))])
    single = _search(server, "blue-milk").json()
    entry = batch.json()["results"][0]["response"]
    assert set(entry) == set(single) and set(entry["results"][0]) == set(single["results"][0])
