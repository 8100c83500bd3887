"""The index build: unreadable images are reported by path and counted, never silently dropped; a build that would
lose a product publishes nothing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.artifacts.manifest import read_manifest, resolve_current
from app.errors import BuildRefused, CatalogueError
from app.offline.build.build_index import REFUSED_REPORT, BuildOptions, Limit, build_index
from app.offline.datasets.catalogue import read_catalogue
from tests.helpers import catalogue_with_lost_sku


def test_bad_rows_are_reported_and_counted(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    shutil.copytree(catalogue.parent, root)
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "img" / "page.jpg").write_bytes(b"<html></html>")
    extra = [
        "red-apple,apple,img/broken.jpg,",
        "red-apple,apple,img/page.jpg,",
        "red-apple,apple,img/missing.jpg,",
        "red-apple,apple,../../etc/passwd,",
        ",apple,img/red-apple_0.jpg,",
    ]
    csv_path = root / "catalogue.csv"
    csv_path.write_text(csv_path.read_text() + "\n".join(extra) + "\n")

    out = tmp_path / "index"
    # 5 of 23 rows fail, no SKU is lost (red-apple keeps its 3 good photos): allowed with a looser image limit.
    options = BuildOptions(progress=False, max_failed_images=Limit(fraction=0.25))
    result = build_index(csv_path, root, out, tiny_model, options)
    reasons = {(p.image, p.reason) for p in result.problems}
    assert reasons == {
        ("img/broken.jpg", "corrupt_image"),
        ("img/page.jpg", "unsupported_format"),
        ("img/missing.jpg", "file missing or unreadable"),
        ("../../etc/passwd", "image path must be relative, inside the images root"),
        ("img/red-apple_0.jpg", "missing sku, category or image"),
    }
    manifest = read_manifest(resolve_current(out))
    assert manifest.n_items == 18 and manifest.build.images_failed == 5 and manifest.build.images_total == 23
    report = json.loads((resolve_current(out) / "build_report.json").read_text())
    assert len(report["problems"]) == 5
    assert {p["sku"] for p in report["problems"]} == {"red-apple", ""}
    assert (report["skus_total"], report["skus_indexed"], report["lost_skus"]) == (6, 6, [])
    assert result.coverage.summary() == "18 of 23 images and 6 of 6 SKUs"


def test_a_second_build_swaps_current(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    first = build_index(catalogue, catalogue.parent, out, tiny_model, BuildOptions(progress=False))
    second = build_index(catalogue, catalogue.parent, out, tiny_model, BuildOptions(progress=False, M=12))
    assert resolve_current(out) == second.version_dir != first.version_dir
    assert first.version_dir.is_dir()  # old versions stay for rollback


def test_catalogue_needs_its_columns(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("name,image\nx,y.jpg\n")
    with pytest.raises(CatalogueError, match=r"c\.csv: line 1: missing column\(s\) sku \(header: name,image\)"):
        read_catalogue(tmp_path / "c.csv")


def test_an_unreadable_catalogue_names_its_line(tmp_path: Path) -> None:
    # Past the reader's first decoded chunk: the line must come from the bytes, not from where decoding stopped.
    body = b"".join(b"S%d,c,i%d.jpg\n" % (i, i) for i in range(2000))
    (tmp_path / "c.csv").write_bytes(b"sku,category,image\n" + body + b"bad,\xff\xfe,x.jpg\n")
    with pytest.raises(CatalogueError, match=r"c\.csv: line 2002: not UTF-8 text"):
        read_catalogue(tmp_path / "c.csv")


def test_attributes_are_kept(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("sku,category,image,title,brand\nA1,milk,a.jpg,Whole milk,Arla\n")
    rows, problems = read_catalogue(tmp_path / "c.csv")
    assert not problems and rows[0].title == "Whole milk" and rows[0].attributes == {"brand": "Arla"}


def test_image_paths_must_stay_inside_the_images_root(tmp_path: Path) -> None:
    bad = ["../secret.jpg", "/etc/passwd", "a/../../b.jpg", "C:/x.jpg", "a\\..\\b.jpg", "a/\0.jpg"]
    good = ["a.jpg", "train/Fruit/Apple/x_001.jpg", "./b.jpg", "dir..name/c.jpg"]
    lines = ["sku,category,image"] + [f"S{i},c,{p}" for i, p in enumerate(bad + good)]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    rows, problems = read_catalogue(tmp_path / "c.csv")
    assert [r.image for r in rows] == good
    assert [p.image for p in problems] == bad
    assert {p.reason for p in problems} == {"image path must be relative, inside the images root"}


def test_published_files_are_read_only(faiss_index: Path) -> None:
    """A memory-mapped shard rewritten under a running server crashes it (SIGBUS): the build publishes every
    file of a version without write permission (docs/hardening.md)."""
    version = resolve_current(faiss_index)
    files = [p for p in version.rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o222 == 0 for p in files)


def test_a_build_that_would_lose_a_sku_publishes_nothing(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    first = build_index(catalogue, catalogue.parent, out, tiny_model, BuildOptions(progress=False))
    before = sorted(p.name for p in out.iterdir())
    csv_path = catalogue_with_lost_sku(catalogue, tmp_path)
    # One failed image is within the image limit given here: the lost SKU alone refuses the build.
    options = BuildOptions(progress=False, max_failed_images=Limit(count=2))
    with pytest.raises(BuildRefused, match=r"1 of 7 SKUs would lose every image \(--max-lost-skus 0\): plum-jam") as e:
        build_index(csv_path, csv_path.parent, out, tiny_model, options)
    assert e.value.lost_skus == ["plum-jam"] and "CURRENT unchanged" in str(e.value)
    assert resolve_current(out) == first.version_dir  # CURRENT not moved
    assert sorted(p.name for p in out.iterdir()) == sorted([*before, REFUSED_REPORT])  # no version, no staging left
    report = json.loads((out / REFUSED_REPORT).read_text())
    assert report["lost_skus"] == ["plum-jam"] and report["skus_indexed"] == 6 and report["images_embedded"] == 18
    assert report["problems"] == [{"line": 20, "image": "img/jam.jpg", "reason": "corrupt_image", "sku": "plum-jam"}]


def test_allowed_losses_are_published_and_reported(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    csv_path = catalogue_with_lost_sku(catalogue, tmp_path)
    options = BuildOptions(progress=False, max_lost_skus=Limit(count=1), max_failed_images=Limit(fraction=0.1))
    result = build_index(csv_path, csv_path.parent, out, tiny_model, options)
    assert resolve_current(out) == result.version_dir
    assert result.coverage.lost_skus == ("plum-jam",)
    assert result.coverage.summary() == "18 of 19 images and 6 of 7 SKUs"
    report = json.loads((result.version_dir / "build_report.json").read_text())
    assert report["lost_skus"] == ["plum-jam"] and (report["skus_total"], report["skus_indexed"]) == (7, 6)


def test_too_many_failed_images_refuse_the_build(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    root = tmp_path / "cat"
    shutil.copytree(catalogue.parent, root)
    csv_path = root / "catalogue.csv"
    csv_path.write_text(csv_path.read_text() + "red-apple,apple,img/missing.jpg,\n")  # 1 of 19: over 1 %
    out = tmp_path / "index"
    with pytest.raises(BuildRefused, match=r"1 of 19 images failed \(fraction 0\.053, --max-failed-images 0\.01\)"):
        build_index(csv_path, root, out, tiny_model, BuildOptions(progress=False))
    assert not (out / "CURRENT").exists() and [p.name for p in out.iterdir()] == [REFUSED_REPORT]


def test_a_catalogue_with_nothing_to_embed_is_bad_input(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(CatalogueError, match=r"no image could be embedded, 18 of 18 rows failed .*--images-root"):
        build_index(catalogue, tmp_path, tmp_path / "index", tiny_model, BuildOptions(progress=False))


@pytest.mark.parametrize(
    ("text", "limit"),
    [("0", Limit(count=0)), ("3", Limit(count=3)), ("0.01", Limit(fraction=0.01)), ("5%", Limit(fraction=0.05)),
     ("1.0", Limit(fraction=1.0)), ("1e-2", Limit(fraction=0.01))],
)  # fmt: skip
def test_limits_are_counts_or_fractions(text: str, limit: Limit) -> None:
    assert Limit.parse(text) == limit


@pytest.mark.parametrize("text", ["-1", "1.5", "150%", "a few", "", "nan"])
def test_bad_limits_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"count|fraction"):
        Limit.parse(text)


def test_limits_compare_against_the_total() -> None:
    assert not Limit(fraction=0.01).exceeded(1, 100) and Limit(fraction=0.01).exceeded(2, 100)
    assert not Limit(count=0).exceeded(0, 5) and Limit(count=0).exceeded(1, 5)
