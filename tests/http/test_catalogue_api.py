"""Catalogue writes over real HTTP, on SQLite and on PostgreSQL: products and images change through the API, are
searchable at once in the process that took them and within VPS_SYNC_S in another replica; bad input refuses the
whole request and changes nothing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.service.app import create_app
from app.service.config import Settings
from tests.conftest import POSTGRES_ADMIN_URL, build_from_catalogue
from tests.helpers import encode, live_server, product_image

TOKEN = "catalogue-test-token"  # noqa: S105 - test credential
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _settings(index: Path, model: Path, url: str, **extra: object) -> Settings:
    return Settings(
        index_dir=index, model_dir=model, warmup_queries=1, open_set=False, admin_token=TOKEN, catalogue_url=url,
        sync_s=0.2, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture
def servers(catalogue_index: Path, tiny_model: Path, catalogue_url: str) -> Iterator[tuple[str, str]]:
    """Two replicas of the service on one catalogue database (two apps, two engines, one database)."""
    with (
        live_server(create_app(_settings(catalogue_index, tiny_model, catalogue_url))) as a,
        live_server(create_app(_settings(catalogue_index, tiny_model, catalogue_url))) as b,
    ):
        yield a, b


def magenta(variant: int) -> bytes:
    rng = np.random.default_rng(variant)
    arr = np.clip(np.full((80, 96, 3), (230, 20, 230), np.float32) + rng.normal(scale=6, size=(80, 96, 3)), 0, 255)
    return encode(Image.fromarray(arr.astype(np.uint8), "RGB"))


def search(base: str, data: bytes, **params: object) -> dict:  # type: ignore[type-arg]
    r = httpx.post(f"{base}/search", files={"image": ("q.jpg", data, "image/jpeg")}, params={"k": 3, **params})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def put(base: str, sku: str, category: str, title: str = "", **attrs: object) -> httpx.Response:
    return httpx.put(f"{base}/v1/products/{sku}", json={"category": category, "title": title, "attributes": attrs},
                     headers=AUTH)  # fmt: skip


def add(base: str, sku: str, *images: bytes) -> httpx.Response:
    files = [("image", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return httpx.post(f"{base}/v1/products/{sku}/images", files=files, headers=AUTH)


def test_writes_need_the_token(servers: tuple[str, str]) -> None:
    a, _ = servers
    assert httpx.put(f"{a}/v1/products/x", json={"category": "c"}).status_code == 401
    r = httpx.put(f"{a}/v1/products/x", json={"category": "c"}, headers={"authorization": "Bearer wrong"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_a_new_product_is_found_at_once_here_and_within_sync_s_on_the_other_replica(servers: tuple[str, str]) -> None:
    a, b = servers
    before = search(a, magenta(99))
    assert all(r["sku"] != "magenta-soap" for r in before["results"])
    r = put(a, "magenta-soap", "soap", "Magenta soap", brand="Acme", price=2.5)
    assert r.status_code == 200 and r.json()["seq"] >= 1
    r = add(a, "magenta-soap", magenta(1), magenta(2))
    assert r.status_code == 201, r.text
    ids = r.json()["image_ids"]
    assert len(ids) == 2

    body = search(a, magenta(99))  # the process that took the write: at once
    top = body["results"][0]
    assert (top["sku"], top["category"], top["title"]) == ("magenta-soap", "soap", "Magenta soap")
    assert top["attributes"] == {"brand": "Acme", "price": 2.5}
    assert top["image_url"].startswith("/v1/products/magenta-soap/images/")
    assert body["routing"]["live"] == ["soap"]  # a category the router has never seen: searched whole
    img = httpx.get(a + top["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert img.content in (magenta(1), magenta(2))

    deadline = time.monotonic() + 2.0  # the other replica: within VPS_SYNC_S (0.2 s here), 2 s at most
    while search(b, magenta(99))["results"][0]["sku"] != "magenta-soap":
        assert time.monotonic() < deadline, "the other replica did not see the change within 2 s"
        time.sleep(0.05)

    got = httpx.get(f"{a}/v1/products/magenta-soap", headers=AUTH).json()
    assert [i["image_id"] for i in got["images"]] == ids and got["seq"] == r.json()["seq"]


def test_one_bad_image_refuses_the_request_and_changes_nothing(servers: tuple[str, str]) -> None:
    a, _ = servers
    put(a, "magenta-soap", "soap")
    seq = httpx.get(f"{a}/v1/products/magenta-soap", headers=AUTH).json()["seq"]
    r = add(a, "magenta-soap", magenta(1), b"\xff\xd8\xff\xe0 not really a jpeg")
    assert r.status_code in (400, 415, 422) and r.json()["error"]["code"] in ("corrupt_image", "unsupported_format")
    got = httpx.get(f"{a}/v1/products/magenta-soap", headers=AUTH).json()
    assert got["images"] == [] and got["seq"] == seq
    assert all(x["sku"] != "magenta-soap" for x in search(a, magenta(99))["results"])


def test_unknown_skus_and_images_are_404(servers: tuple[str, str]) -> None:
    a, _ = servers
    r = add(a, "no-such-sku", magenta(1))
    assert r.status_code == 404 and r.json()["error"]["code"] == "product_not_found"
    assert httpx.delete(f"{a}/v1/products/no-such-sku", headers=AUTH).status_code == 404
    assert httpx.get(f"{a}/v1/products/no-such-sku", headers=AUTH).status_code == 404
    put(a, "x", "soap")
    r = httpx.delete(f"{a}/v1/products/x/images/{'0' * 24}", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_found"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/products/bad%20sku", {"category": "c"}),
        ("/v1/products/ok", {"category": ""}),
        ("/v1/products/ok", {"category": "c", "colour": "red"}),
        ("/v1/products/ok", {"category": "c", "attributes": {"price": [1, 2]}}),
        ("/v1/products/ok", {"category": "c\n"}),
        ("/v1/products/ok", {"category": "c", "attributes": {"k": "x" * 1001}}),
        ("/v1/products/ok", {"category": "c", "attributes": {f"k{i}": "x" * 900 for i in range(30)}}),  # > 16 KiB
    ],
)
def test_bad_products_are_422(servers: tuple[str, str], path: str, body: dict) -> None:  # type: ignore[type-arg]
    a, _ = servers
    r = httpx.put(a + path, json=body, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", r.text


def test_a_replaced_product_hides_its_indexed_images_and_a_deleted_one_vanishes(servers: tuple[str, str]) -> None:
    a, b = servers
    query = encode(product_image("red-apple", 99))
    assert search(a, query)["results"][0]["sku"] == "red-apple"
    # Replace red-apple: new title, one new image; its indexed photos are masked, the new one speaks for it.
    put(a, "red-apple", "apple", "Red apple, new label")
    add(a, "red-apple", encode(product_image("red-apple", 7)))
    top = search(a, query)["results"][0]
    assert (top["sku"], top["title"]) == ("red-apple", "Red apple, new label")
    assert top["image_url"].startswith("/v1/products/red-apple/images/")
    r = httpx.delete(f"{a}/v1/products/red-apple", headers=AUTH)
    assert r.status_code == 200
    assert all(x["sku"] != "red-apple" for x in search(a, query, k=6)["results"])
    deadline = time.monotonic() + 2.0
    while any(x["sku"] == "red-apple" for x in search(b, query, k=6)["results"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_an_unreachable_catalogue_refuses_writes_and_keeps_serving(
    catalogue: Path, tiny_model: Path, tmp_path: Path
) -> None:
    index = build_from_catalogue(f"sqlite:///{tmp_path / 'c.db'}", catalogue, tiny_model, tmp_path / "index")
    settings = _settings(index, tiny_model, "postgresql+psycopg://nobody@127.0.0.1:1/none")
    with live_server(create_app(settings)) as base:
        r = put(base, "x", "soap")
        assert r.status_code == 503 and r.json()["error"]["code"] == "catalogue_unavailable"
        assert search(base, magenta(1))["results"]
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 200 and "catalogue" in ready.json()["detail"]


def test_a_large_delta_is_compacted_into_a_version_and_served_from_it(
    catalogue: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """VPS_COMPACT_ABOVE: past it the process runs `vps compact` as a child, then reloads the new version."""
    url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    index = build_from_catalogue(url, catalogue, tiny_model, tmp_path / "index")
    with live_server(create_app(_settings(index, tiny_model, url, compact_above=1))) as a:
        first = httpx.get(f"{a}/v1/info").json()["index"]["version"]
        put(a, "magenta-soap", "soap", "Magenta soap")
        assert add(a, "magenta-soap", magenta(1), magenta(2)).status_code == 201  # 2 delta images > 1
        deadline = time.monotonic() + 120
        while httpx.get(f"{a}/v1/info").json()["index"]["version"] == first:
            assert time.monotonic() < deadline, "no compacted version within 120 s"
            time.sleep(0.5)
        info = httpx.get(f"{a}/v1/info").json()
        assert "soap" in info["categories"] and info["index"]["catalogue_seq"] >= 2
        body = search(a, magenta(99))
        assert body["results"][0]["sku"] == "magenta-soap" and body["routing"]["live"] == []  # a shard now
        assert 'vps_catalogue_compactions_total{result="success"} 1.0' in httpx.get(f"{a}/metrics").text
        while "vps_catalogue_delta_items 0.0" not in httpx.get(f"{a}/metrics").text:  # the follower's next sync
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_two_replicas_writing_one_sku_at_once_leave_one_request_whole(servers: tuple[str, str]) -> None:
    a, b = servers
    put(a, "contested", "soap")
    for round_ in range(10):
        bodies = {
            a: {"category": "soap", "title": f"from a {round_}", "attributes": {"writer": "a", "round": round_}},
            b: {"category": "juice", "title": f"from b {round_}", "attributes": {"writer": "b", "round": round_}},
        }
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(httpx.put, f"{base}/v1/products/contested", json=body, headers=AUTH)
                       for base, body in bodies.items()]  # fmt: skip
            codes = [f.result().status_code for f in futures]
        assert codes == [200, 200]
        got = httpx.get(f"{a}/v1/products/contested", headers=AUTH).json()
        winner = {k: got[k] for k in ("category", "title", "attributes")}
        assert winner in list(bodies.values())  # one of the two requests, never a mix


def test_a_database_lost_while_serving_refuses_writes_keeps_searching_and_recovers(
    catalogue: Path, tiny_model: Path, fresh_postgres: str, tmp_path: Path
) -> None:
    """PostgreSQL stops taking connections mid-run (new ones refused, open ones terminated), then comes back."""
    import sqlalchemy as sa

    postgres_url = fresh_postgres
    index = build_from_catalogue(postgres_url, catalogue, tiny_model, tmp_path / "index")
    name = postgres_url.rsplit("/", 1)[1]
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def allow(on: bool) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS {str(on).lower()}')
            if not on:
                conn.execute(
                    sa.text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :name"),
                    {"name": name},
                )

    with live_server(create_app(_settings(index, tiny_model, postgres_url))) as a:
        put(a, "magenta-soap", "soap")
        add(a, "magenta-soap", magenta(1))
        try:
            allow(False)
            r = put(a, "magenta-soap", "soap", "while down")
            assert r.status_code == 503 and r.json()["error"]["code"] == "catalogue_unavailable"
            assert search(a, magenta(99))["results"][0]["sku"] == "magenta-soap"  # the last state, still served
            deadline = time.monotonic() + 10
            while "catalogue" not in httpx.get(f"{a}/readyz").json().get("detail", ""):
                assert time.monotonic() < deadline, "readiness never said the catalogue is degraded"
                time.sleep(0.1)
            assert httpx.get(f"{a}/readyz").status_code == 200
        finally:
            allow(True)
        deadline = time.monotonic() + 10
        while put(a, "magenta-soap", "soap", "back").status_code != 200:
            assert time.monotonic() < deadline, "writes did not recover"
            time.sleep(0.2)
        while httpx.get(f"{a}/readyz").json().get("detail"):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    admin.dispose()


def test_a_database_down_at_start_up_is_followed_once_it_answers(
    catalogue: Path, tiny_model: Path, fresh_postgres: str, tmp_path: Path
) -> None:
    import sqlalchemy as sa

    postgres_url = fresh_postgres
    index = build_from_catalogue(postgres_url, catalogue, tiny_model, tmp_path / "index")
    name = postgres_url.rsplit("/", 1)[1]
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
    try:
        with live_server(create_app(_settings(index, tiny_model, postgres_url))) as a:
            assert put(a, "magenta-soap", "soap").status_code == 503
            assert "catalogue" in httpx.get(f"{a}/readyz").json()["detail"]
            with admin.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
            deadline = time.monotonic() + 10
            while put(a, "magenta-soap", "soap").status_code != 200:
                assert time.monotonic() < deadline, "writes did not start once the database answered"
                time.sleep(0.2)
            assert add(a, "magenta-soap", magenta(1)).status_code == 201
            assert search(a, magenta(99))["results"][0]["sku"] == "magenta-soap"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
        admin.dispose()


def test_an_index_built_without_the_database_refuses_writes(
    faiss_index: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """Its products are unknown to the database: a write would hide them (masking), so it is refused, saying why."""
    with live_server(create_app(_settings(faiss_index, tiny_model, f"sqlite:///{tmp_path / 'c.db'}"))) as a:
        r = put(a, "red-apple", "apple", "new title")
        assert r.status_code == 409 and r.json()["error"]["code"] == "index_not_from_catalogue"
        assert search(a, encode(product_image("red-apple", 99)))["results"][0]["sku"] == "red-apple"


def test_an_index_from_another_catalogue_database_refuses_writes(
    catalogue: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A version compacted from database A served against a fresh database B: writes would never show."""
    index = build_from_catalogue(f"sqlite:///{tmp_path / 'a.db'}", catalogue, tiny_model, tmp_path / "index")
    with live_server(create_app(_settings(index, tiny_model, f"sqlite:///{tmp_path / 'b.db'}"))) as base:
        r = put(base, "red-apple", "apple", "new title")
        assert r.status_code == 409 and "another catalogue database" in r.json()["error"]["message"]
        deadline = time.monotonic() + 5
        while "another catalogue database" not in httpx.get(f"{base}/readyz").json().get("detail", ""):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_attributes_that_could_not_be_written_out_are_422(servers: tuple[str, str]) -> None:
    a, _ = servers
    for raw in ('{"category": "c", "attributes": {"k": "\\ud800"}}', '{"category": "c", "attributes": {"k": NaN}}'):
        r = httpx.put(f"{a}/v1/products/ok", content=raw, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_parameter", (raw, r.text)
