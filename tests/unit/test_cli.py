"""`vps`: a failure is one line naming the file, line or option, with the exit code of its kind (README "Command
line: errors and exit codes"); --debug adds the traceback; the default model is found from any directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command
from typer.testing import CliRunner, Result

from app.cli import EXIT_ARTIFACT, EXIT_INPUT, EXIT_REFUSED, EXIT_USAGE, cli, fmt
from app.service.config import SHIPPED_MODEL_DIR
from tests.helpers import catalogue_with_lost_sku

VPS = str(Path(sys.executable).with_name("vps"))


pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture(autouse=True)
def _no_user_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VPS_DEBUG", raising=False)
    monkeypatch.delenv("VPS_MODEL_DIR", raising=False)


def vps(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def errors(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_a_missing_csv_column_is_one_line_and_exit_3(tiny_model: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("name,image\nx,y.jpg\n")
    result = vps("build-index", "--catalogue", csv_path, "--images-root", tmp_path, "--model", tiny_model,
                 "--out", tmp_path / "index")  # fmt: skip
    assert result.exit_code == EXIT_INPUT, result.output
    assert errors(result) == [f"error: {csv_path}: line 1: missing column(s) sku (header: name,image); "
                              "expected sku,[category,]image[,title,...]"]  # fmt: skip
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(tiny_model: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("name,image\nx,y.jpg\n")
    args: list[str | Path] = ["build-index", "--catalogue", csv_path, "--images-root", tmp_path, "--model", tiny_model]
    for result in (vps("--debug", *args), vps(*args, env={"VPS_DEBUG": "1"})):
        assert result.exit_code == EXIT_INPUT
        assert "Traceback (most recent call last)" in result.stderr and "CatalogueError" in result.stderr
        assert len(errors(result)) == 1  # the line still ends it


def test_a_bad_backend_lists_the_choices(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    result = vps("build-index", "--catalogue", catalogue, "--images-root", catalogue.parent, "--backend", "annoy")
    assert result.exit_code == EXIT_USAGE
    assert "'--backend'" in result.stderr and "'faiss', 'hnswlib', 'faiss-sq8'" in result.stderr
    assert "Traceback" not in result.output
    help_text = vps("build-index", "--help").stdout
    assert "--backend <faiss|hnswlib|faiss-sq8>" in help_text and "--max-lost-skus" in help_text


def test_a_bad_limit_names_its_option(catalogue: Path, tmp_path: Path) -> None:
    result = vps("build-index", "--catalogue", catalogue, "--images-root", catalogue.parent,
                 "--max-failed-images", "a few")  # fmt: skip
    assert result.exit_code == EXIT_USAGE and "--max-failed-images" in result.stderr
    assert "'a few' is neither a count (3) nor a fraction (0.01, 5%)" in result.stderr


def test_every_option_is_described_and_choices_are_listed() -> None:
    group = get_command(cli)
    undescribed = [
        f"{name} {opt.opts}"
        for name, command in group.commands.items()  # type: ignore[attr-defined]
        for opt in command.params
        if not getattr(opt, "help", None) and "--help" not in opt.opts
    ]
    assert undescribed == []
    help_of = {name: vps(name, "--help").stdout for name in ("train", "grocery-catalogue")}
    assert "<ms|proxy_anchor|triplet>" in help_of["train"] and "<train|val|iconic>" in help_of["grocery-catalogue"]


def test_a_missing_model_card_is_exit_4(catalogue: Path, tmp_path: Path) -> None:
    result = vps("build-index", "--catalogue", catalogue, "--images-root", catalogue.parent, "--model", tmp_path)
    assert result.exit_code == EXIT_ARTIFACT
    assert errors(result) == [f"error: model card missing: {tmp_path / 'model.json'} (model directory from --model)"]


def test_no_default_model_says_where_it_looked(
    catalogue: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.cli.SHIPPED_MODEL_DIR", tmp_path / "nowhere")
    result = vps("build-index", "--catalogue", catalogue, "--images-root", catalogue.parent)
    assert result.exit_code == EXIT_ARTIFACT
    [line] = errors(result)
    assert f"the shipped model is not at {tmp_path / 'nowhere'}" in line and "VPS_MODEL_DIR" in line


def test_a_lost_sku_refuses_the_build_and_keeps_current(catalogue: Path, tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "index"
    good = vps("build-index", "--catalogue", catalogue, "--images-root", catalogue.parent, "--model", tiny_model,
               "--out", out)  # fmt: skip
    assert good.exit_code == 0, good.output
    assert "indexed 18 of 18 images and 6 of 6 SKUs in 3 categories; 0 images skipped, 0 SKUs lost" in good.stdout
    current = (out / "CURRENT").read_text()
    csv_path = catalogue_with_lost_sku(catalogue, tmp_path)
    args: list[str | Path] = ["build-index", "--catalogue", csv_path, "--images-root", csv_path.parent,
                              "--model", tiny_model, "--out", out]  # fmt: skip

    refused = vps(*args)
    assert refused.exit_code == EXIT_REFUSED, refused.output
    [line] = errors(refused)
    assert "build refused, nothing published, CURRENT unchanged: 1 of 7 SKUs would lose every image" in line
    assert "(--max-lost-skus 0): plum-jam" in line and "1 of 19 images failed" in line
    assert f"report: {out / 'refused-build-report.json'}" in line and "Traceback" not in refused.output
    assert (out / "CURRENT").read_text() == current
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1  # no new version, no staging directory left

    allowed = vps(*args, "--max-lost-skus", "1", "--max-failed-images", "1")
    assert allowed.exit_code == 0, allowed.output
    assert "usable 18 of 19 images and 6 of 7 SKUs; 1 images skipped, 1 SKUs lost" in allowed.stdout
    assert "lost SKUs (every image failed): plum-jam" in allowed.stderr
    assert "skipped line 20: img/jam.jpg: corrupt_image" in allowed.stderr
    # What can be indexed did not change (plum-jam has nothing to index): no new version.
    assert "unchanged: " in allowed.stdout and (out / "CURRENT").read_text() == current
    assert not (out / "refused-build-report.json").exists()  # the refusal no longer describes the catalogue


def test_the_default_model_is_found_from_any_directory(catalogue: Path, tmp_path: Path) -> None:
    """`vps build-index` without --model, run outside the repository: the shipped model, named in the output."""
    env = {k: v for k, v in os.environ.items() if k != "VPS_MODEL_DIR"}
    result = subprocess.run(
        [VPS, "build-index", "--catalogue", str(catalogue), "--images-root", str(catalogue.parent)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        f"model: grocery-lite1-ms512-sp208-int8 1.1.0 sha256 552b984c78b0 ({SHIPPED_MODEL_DIR}, the shipped default)"
        in (result.stdout)
    )
    assert (tmp_path / "index_data" / "CURRENT").is_file()  # --out is still relative to where it runs


def test_evaluate_prints_figures_with_three_decimals(
    faiss_index: Path, catalogue: Path, tiny_model: Path, tmp_path: Path
) -> None:
    result = vps("evaluate", "--index", faiss_index, "--queries", catalogue, "--images-root", catalogue.parent,
                 "--model", tiny_model, "--out", tmp_path / "report")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert re.search(r"recall@1=\d\.\d{3} recall@5=\d\.\d{3} router top-1=\d\.\d{3} -> ", result.stdout), result.stdout


def test_figures_are_rounded_to_three_decimals() -> None:
    assert [fmt(0.9666666666666667), fmt(1.0), fmt(3), fmt(None)] == ["0.967", "1.000", "3", "n/a"]


@pytest.mark.parametrize("router", ["linear", "prototype"])
def test_the_router_option_chooses_the_router_kind(
    catalogue: Path, tiny_model: Path, tmp_path: Path, router: str
) -> None:
    from app.artifacts.manifest import read_manifest, resolve_current
    from app.engine.routing import load_router

    out = tmp_path / "index"
    result = vps("build-index", "--catalogue", catalogue, "--images-root", catalogue.parent, "--model", tiny_model,
                 "--out", out, "--router", router)  # fmt: skip
    assert result.exit_code == 0, result.output
    version = resolve_current(out)
    assert read_manifest(version).router_report["kind"] == router
    assert load_router(version / "router.npz").kind == router


def test_train_options_that_do_not_fit_the_backbone_are_a_usage_error(catalogue: Path, tmp_path: Path) -> None:
    """Checked before any photo is decoded."""
    pytest.importorskip("torch", reason="the train extra (torch) is not installed")
    result = vps(
        "train", "--catalogue", catalogue, "--images-root", catalogue.parent, "--out", tmp_path / "run",
        "--backbone", "lite0", "--freeze-blocks", "17",
    )  # fmt: skip
    assert result.exit_code == EXIT_USAGE
    assert "freeze_blocks: lite0 has 16 MBConv blocks, not 17" in result.stderr
    assert not (tmp_path / "run").exists()
