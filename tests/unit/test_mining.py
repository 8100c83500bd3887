"""`vps mine` and `vps label import`: the photos a label would teach the most come first, near-duplicates are
collapsed, the queue and its contact sheet are written, and a labelled queue goes back in as catalogue rows,
calibration queries or training pairs (the tiny real model and a real faiss index)."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from app.cli import cli
from app.errors import CatalogueError
from app.offline.datasets.catalogue import read_catalogue
from app.offline.mining.jobs import import_labels, run_mine
from app.offline.mining.mine import QUEUE_COLUMNS, score, select
from app.service.config import Settings
from app.service.engines import load_engine
from tests.helpers import encode, product_image

pytestmark = pytest.mark.usefixtures("restore_logging")


def _blend(a: str, b: str) -> Image.Image:
    """Half one product, half the other: the index cannot tell which."""
    left, right = product_image(a, 60), product_image(b, 60)
    out = left.copy()
    out.paste(right.crop((48, 0, 96, 80)), (48, 0))
    return out


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    root = tmp_path / "pool"
    root.mkdir()
    (root / "plain-milk.jpg").write_bytes(encode(product_image("blue-milk", 61), "JPEG", quality=95))
    (root / "plain-juice.jpg").write_bytes(encode(product_image("orange-juice", 61), "JPEG", quality=95))
    blend = encode(_blend("red-apple", "green-apple"), "JPEG", quality=95)
    (root / "blend.jpg").write_bytes(blend)
    (root / "blend-again.jpg").write_bytes(blend + b"burst")  # the same shot twice: one case
    grey = np.full((80, 96, 3), 128, np.uint8)
    grey[::2] = 20
    (root / "unknown.png").write_bytes(encode(Image.fromarray(grey), "PNG"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing")
    return root


def test_the_queue_puts_uncertain_photos_first_and_collapses_duplicates(
    faiss_index: Path, tiny_model: Path, pool: Path, tmp_path: Path
) -> None:
    engine = load_engine(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0))
    done = run_mine(engine, pool, tmp_path / "out", budget=10, catalogue_root=faiss_index.parent)
    r = done.result
    queued = [c.photo for c in r.queue]
    assert r.seen == 6 and [f for f, _ in r.failed] == ["broken.jpg"] and r.duplicates == 1
    blends = [p for p in queued if p.startswith("blend")]
    assert len(blends) == 1  # burst twins collapsed
    blend = blends[0]
    assert set(queued) - {blend} == {"plain-milk.jpg", "plain-juice.jpg", "unknown.png"}
    priority = [c.priority for c in r.queue]
    assert priority == sorted(priority, reverse=True)
    # The tiny model tells blue milk from everything (its top-two gap is 0.73) but orange juice from red apples
    # barely (0.02): the juice photo is the one a label teaches, the milk photo comes last.
    assert queued[-1] == "plain-milk.jpg" and r.queue[-1].priority == 0.0
    assert queued.index("plain-juice.jpg") < queued.index("plain-milk.jpg")
    with done.queue.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == QUEUE_COLUMNS and [row["photo"] for row in rows] == queued
    assert rows[queued.index("plain-milk.jpg")]["suggested_sku"] == "blue-milk"
    sheet = done.sheet.read_text()
    assert sheet.count("<section class=case>") == len(queued)
    assert not re.search(r"(src|href)=\"(https?:|//)", sheet) and "data:image/jpeg;base64," in sheet


def test_select_skips_near_duplicates_and_honours_the_budget() -> None:
    class _C:
        def __init__(self, photo: str, v: list[float], p: float) -> None:
            self.photo, self.vector, self._p = photo, np.asarray(v, np.float32), p

        @property
        def priority(self) -> float:
            return self._p

    a, a2, b, c = _C("a", [1, 0], 0.9), _C("a2", [0.999, 0.0447], 0.8), _C("b", [0, 1], 0.5), _C("c", [0.6, 0.8], 0.1)
    queue, dup = select([c, b, a2, a], 2, 0.97)  # type: ignore[list-item]
    assert [x.photo for x in queue] == ["a", "b"] and dup == 1


def test_scores_are_high_where_a_label_teaches_much(faiss_index: Path, tiny_model: Path) -> None:
    engine = load_engine(Settings(index_dir=faiss_index, model_dir=tiny_model, warmup_queries=0))
    from app.offline.mining.mine import mining_params

    params = mining_params(engine, 5)
    plain = score(engine.search_image(encode(product_image("blue-milk", 62)), params), engine)
    close = score(engine.search_image(encode(product_image("orange-juice", 62)), params), engine)
    assert close["margin"] > 0.5 > plain["margin"]
    assert all(0.0 <= v <= 1.0 for v in (*plain.values(), *close.values()))


def test_a_labelled_queue_goes_back_as_catalogue_rows_and_pairs(tmp_path: Path) -> None:
    queue = tmp_path / "queue.csv"
    rows = [
        {"photo": "pool/a.jpg", "suggested_sku": "red-apple", "second_sku": "green-apple", "sku": "green-apple"},
        {"photo": "pool/b.jpg", "suggested_sku": "blue-milk", "second_sku": "white-milk", "sku": "skip"},
        {"photo": "pool/c.jpg", "suggested_sku": "blue-milk", "second_sku": "white-milk", "sku": ""},
        {"photo": "pool/d.jpg", "suggested_sku": "blue-milk", "second_sku": "white-milk", "sku": "blue-milk"},
    ]
    with queue.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=QUEUE_COLUMNS)
        w.writeheader()
        w.writerows([{k: r.get(k, "") for k in QUEUE_COLUMNS} for r in rows])
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("sku,category,image\nred-apple,apple,x.jpg\ngreen-apple,apple,y.jpg\nblue-milk,milk,z.jpg\n")
    assert import_labels(queue, "catalogue", catalogue, {"green-apple": "apple", "blue-milk": "milk"}) == 2
    back, problems = read_catalogue(catalogue)
    assert not problems and [(r.sku, r.category, r.image) for r in back[3:]] == [
        ("green-apple", "apple", "pool/a.jpg"),
        ("blue-milk", "milk", "pool/d.jpg"),
    ]
    pairs = tmp_path / "pairs.csv"
    assert import_labels(queue, "pairs", pairs, {}) == 2
    assert pairs.read_text().splitlines() == [
        "anchor,sku,negative_sku",
        "pool/a.jpg,green-apple,red-apple",  # confused with the suggestion
        "pool/d.jpg,blue-milk,white-milk",  # the suggestion was right: the runner-up is the negative
    ]
    with pytest.raises(CatalogueError, match="not in the index: add a `category` column"):
        import_labels(queue, "calibration", tmp_path / "cal.csv", {})


def test_the_commands_end_to_end(faiss_index: Path, tiny_model: Path, pool: Path, tmp_path: Path) -> None:
    out = tmp_path / "mined"
    r = CliRunner().invoke(
        cli, ["mine", "--queries", str(pool), "--index", str(faiss_index), "--model", str(tiny_model),
              "--budget", "3", "--out", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "queued 3 of 6 photos" in r.stdout and "1 could not be searched" in r.stdout
    with (out / "queue.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["sku"] = row["suggested_sku"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=QUEUE_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    (out / "queue.csv").write_text(buf.getvalue())
    catalogue = tmp_path / "cat.csv"
    catalogue.write_text("sku,category,image\n" + "".join(f"{s},{c},x.jpg\n" for s, c in (
        ("red-apple", "apple"), ("green-apple", "apple"), ("blue-milk", "milk"), ("white-milk", "milk"),
        ("yellow-juice", "juice"), ("orange-juice", "juice"))))  # fmt: skip
    cal = tmp_path / "calibration.csv"
    r = CliRunner().invoke(
        cli, ["label", "import", str(out / "queue.csv"), "--as", "calibration", "--into", str(cal),
              "--catalogue", str(catalogue)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "appended 3 labelled rows" in r.stdout and len(read_catalogue(cal)[0]) == 3
