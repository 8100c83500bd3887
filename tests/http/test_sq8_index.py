"""An index built with the compressed backend (`vps build-index --backend faiss-sq8`) loads, verifies and serves,
over real HTTP, the answers the float index serves: the re-scored scores are the exact ones."""

from __future__ import annotations

from pathlib import Path

import httpx

from app.artifacts.manifest import read_manifest, resolve_current
from app.service.app import create_app
from app.service.engines import load_engine
from tests.helpers import encode, live_server, product_image


def test_an_index_built_with_faiss_sq8_serves_the_float_index_answers(  # type: ignore[no-untyped-def]
    sq8_index: Path, faiss_index: Path, settings_for
) -> None:
    manifest = read_manifest(resolve_current(sq8_index))
    assert manifest.backend == "faiss-sq8" and manifest.build.rescore_factor == 1
    assert all(c.shard.endswith(".sq8.faiss") for c in manifest.categories)
    assert len(load_engine(settings_for(sq8_index)).shards) == len(manifest.categories)
    answers = []
    for index in (sq8_index, faiss_index):
        with live_server(create_app(settings_for(index))) as base:
            hits = []
            for sku, variant in (("blue-milk", 7), ("orange-juice", 8), ("red-apple", 9)):
                r = httpx.post(f"{base}/search?k=4", files={"image": encode(product_image(sku, variant))}, timeout=30)
                assert r.status_code == 200, r.text
                hits.append([(h["sku"], round(h["score"], 4)) for h in r.json()["results"]])
            answers.append(hits)
    assert answers[0] == answers[1]
    assert [h[0][0] for h in answers[0]] == ["blue-milk", "orange-juice", "red-apple"]
