"""The catalogue of record on both databases: SQLite (a file per test) and the PostgreSQL server this machine runs
(a database per test run). Writes are whole or absent; sequence numbers are gap-free in commit order."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from app.catalogue.store import CatalogueStore, NewImage, image_id_for, sha256_of
from app.errors import CatalogueUnavailable, ImageNotFound, ProductNotFound

MODEL = "m" * 64


def _image(seed: int, dim: int = 8) -> NewImage:
    data = f"image-{seed}".encode()
    vec = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return NewImage(sha256_of(data), data, vec / np.linalg.norm(vec))


@pytest.fixture
def store(catalogue_url: str) -> CatalogueStore:
    s = CatalogueStore(catalogue_url)
    s.create_schema()
    s.create_schema()  # idempotent: a restart runs it again
    return s


def test_a_product_and_its_images_round_trip(store: CatalogueStore) -> None:
    assert store.head() == 0
    seq1 = store.put_product("milk-1l", "milk", "Milk 1 l", {"brand": "Arla", "price": 12.5})
    seq2, ids = store.add_images("milk-1l", [_image(1), _image(2)], MODEL)
    assert (seq1, seq2) == (1, 2) and ids == [image_id_for(_image(1).sha256), image_id_for(_image(2).sha256)]
    state = store.get_product("milk-1l", MODEL)
    assert (state.category, state.title, state.attributes, state.seq) == (
        "milk",
        "Milk 1 l",
        {"brand": "Arla", "price": 12.5},
        2,
    )
    assert [i.image_id for i in state.images] == ids
    assert state.images[0].vector is not None and np.allclose(state.images[0].vector, _image(1).vector)
    assert store.image_bytes("milk-1l", ids[1]) == (b"image-2", None)
    # Another model has no vectors for these images yet.
    assert all(i.vector is None for i in store.get_product("milk-1l", "other").images)


def test_the_same_bytes_twice_are_one_image(store: CatalogueStore) -> None:
    store.put_product("a", "c", "A", {})
    _, first = store.add_images("a", [_image(1)], MODEL)
    _, again = store.add_images("a", [_image(1)], MODEL)
    assert first == again and len(store.get_product("a").images) == 1


def test_unknown_products_and_images_are_404_and_change_nothing(store: CatalogueStore) -> None:
    with pytest.raises(ProductNotFound):
        store.add_images("nope", [_image(1)], MODEL)
    with pytest.raises(ProductNotFound):
        store.delete_product("nope")
    with pytest.raises(ProductNotFound):
        store.get_product("nope")
    store.put_product("a", "c", "A", {})
    with pytest.raises(ImageNotFound):
        store.delete_image("a", "missing")
    # Refused writes used no sequence number and logged no change.
    assert store.head() == 1
    assert list(store.changes_since(0, MODEL).products) == ["a"]


def test_changes_since_give_the_current_state_of_every_changed_sku(store: CatalogueStore) -> None:
    store.put_product("a", "c1", "A", {})
    store.put_product("b", "c2", "B", {})
    _, ids = store.add_images("a", [_image(1), _image(2)], MODEL)
    store.delete_image("a", ids[0])
    store.delete_product("b")
    batch = store.changes_since(0, MODEL)
    assert batch.head == 5 and batch.head_at > 0
    assert batch.products["b"] is None  # deleted
    a = batch.products["a"]
    assert a is not None and [i.image_id for i in a.images] == [ids[1]]
    later = store.changes_since(3, MODEL)
    assert set(later.products) == {"a", "b"} and later.after == 3
    assert store.changes_since(5, MODEL).products == {} and store.changes_since(5, MODEL).head == 5


def test_changes_since_pages_by_sku(store: CatalogueStore) -> None:
    for i in range(5):
        store.put_product(f"s{i}", "c", "t", {})
    first = store.changes_since(0, MODEL, max_skus=2)
    assert list(first.products) == ["s0", "s1"] and first.head == 2
    rest = store.changes_since(first.head, MODEL, max_skus=10)
    assert list(rest.products) == ["s2", "s3", "s4"] and rest.head == 5


def test_a_deleted_product_takes_its_images_and_can_come_back(store: CatalogueStore) -> None:
    store.put_product("a", "c", "A", {})
    store.add_images("a", [_image(1)], MODEL)
    store.delete_product("a")
    with pytest.raises(ProductNotFound):
        store.get_product("a")
    store.put_product("a", "c", "A again", {})
    assert store.get_product("a").images == ()
    # The bytes and the vector stay stored: adding the image again embeds nothing new (compaction re-uses them).
    assert store.blob(_image(1).sha256) == b"image-1"


def test_concurrent_writers_get_distinct_gap_free_sequence_numbers(store: CatalogueStore) -> None:
    store.put_product("a", "c", "A", {})
    seqs: list[int] = []
    lock = threading.Lock()

    def write(n: int) -> None:
        for j in range(10):
            seq = store.put_product("a", "c", f"writer {n} step {j}", {"n": n})
            with lock:
                seqs.append(seq)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seqs) == list(range(2, 42))
    final = store.get_product("a")
    assert final.seq == 41 and final.title.startswith(f"writer {final.attributes['n']} ")  # one writer's, whole


def test_snapshot_holds_every_product_at_one_sequence_number(store: CatalogueStore) -> None:
    store.put_product("b", "c", "B", {})
    store.put_product("a", "c", "A", {"x": "1"})
    store.add_images("a", [_image(1)], MODEL)
    head, states = store.snapshot(MODEL)
    assert head == 3 and [s.sku for s in states] == ["a", "b"]
    assert states[0].images[0].vector is not None


def test_an_unreachable_database_is_catalogue_unavailable(tmp_path: object) -> None:
    store = CatalogueStore("postgresql+psycopg://nobody@127.0.0.1:1/none", connect_timeout_s=1)
    with pytest.raises(CatalogueUnavailable):
        store.put_product("a", "c", "A", {})
    with pytest.raises(CatalogueUnavailable):
        store.head()


def test_the_catalogue_url_is_validated_and_defaults_to_sqlite_in_the_index_dir(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from app.service.config import Settings

    assert Settings(index_dir=tmp_path).catalogue_database_url() == f"sqlite:///{tmp_path / 'catalogue.db'}"
    bare = Settings(catalogue_url="postgresql://u@h/db")  # type: ignore[arg-type]
    assert bare.catalogue_database_url() == "postgresql+psycopg://u@h/db"  # psycopg 3, not psycopg2
    with pytest.raises(ValidationError, match="catalogue_url"):
        Settings(catalogue_url="mysql://u@h/db")  # type: ignore[arg-type]


def test_a_lease_is_held_by_one_until_released_or_expired(store: CatalogueStore) -> None:
    assert store.take_lease("compaction", ttl_s=60)
    assert not store.take_lease("compaction", ttl_s=60)  # another process, another replica: refused
    store.release_lease("compaction")
    assert store.take_lease("compaction", ttl_s=-5)  # taken, already expired: a dead holder
    assert store.take_lease("compaction", ttl_s=60)
