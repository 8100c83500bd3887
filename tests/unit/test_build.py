"""The index build: unreadable images are reported by path and counted, never silently dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.artifacts.manifest import read_manifest, resolve_current
from app.offline.build.build_index import BuildOptions, build_index
from app.offline.datasets.catalogue import read_catalogue


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
    result = build_index(csv_path, root, out, tiny_model, BuildOptions(progress=False))
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


def test_a_second_build_swaps_current(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    first = build_index(catalogue, catalogue.parent, out, tiny_model, BuildOptions(progress=False))
    second = build_index(catalogue, catalogue.parent, out, tiny_model, BuildOptions(progress=False, M=12))
    assert resolve_current(out) == second.version_dir != first.version_dir
    assert first.version_dir.is_dir()  # old versions stay for rollback


def test_catalogue_needs_its_columns(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("name,image\nx,y.jpg\n")
    with pytest.raises(ValueError, match="missing column"):
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
