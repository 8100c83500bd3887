"""Docs that match the code: every `vps`, `make` and `python scripts/...` command README.md and docs/*.md show (in
```bash blocks and inline code) runs, at least as `--help`, with every option and choice they give it; every
`pip install '.[extra]'` names an extra of pyproject.toml; every `VPS_*` name they mention is a setting
(app/service/config.py) or one of the few variables read elsewhere, listed below with where."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib.util import find_spec
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.service.config import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")  # inline code; it may wrap onto the next line
# One command of a line: a comment, `&&`, `;` or a spaced pipe ends it (`faiss|hnswlib` is a value, not a pipe).
SEGMENT = re.compile(r"\s#\s*|^#\s*|&&|;|\s\|\s")
COMMAND = re.compile(r"(?:^|(?<=[\s(]))(?:\.venv/bin/)?(?P<tool>vps|make|python3?|pip)\s+(?P<rest>\S.*)$")
# An option and the value shown after it, if any (`--backend faiss|hnswlib`; in `--host --port` none).
OPTION = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*)(?:[ =]+([^\s\[\]-][^\s\[\]]*))?")

# VPS_* names that are not Settings fields, each with where it is read (checked below).
NOT_SETTINGS = {
    # `vps serve --workers` reads it (a CLI option's envvar: workers are processes, not a setting of one).
    "VPS_WORKERS": "app/cli.py",
    # `vps --debug`: print a failure's traceback.
    "VPS_DEBUG": "app/cli.py",
    # Test tiers: the shared grocery dataset for tests/data, examples per property test.
    "VPS_DATASET_DIR": "tests/conftest.py",
    "VPS_CONTRACT_EXAMPLES": "tests/http/test_contract.py",
    "VPS_FUZZ_EXAMPLES": "tests/unit/test_fuzz_decode.py",
    # Tests on PostgreSQL: where the server is, and (CI) fail instead of skipping when it cannot be reached.
    "VPS_TEST_POSTGRES_URL": "tests/conftest.py",
    "VPS_REQUIRE_POSTGRES": "tests/conftest.py",
    "VPS_REQUIRE_RAY": "tests/ray/test_ray_build.py",
}


@dataclass(frozen=True)
class Command:
    doc: str
    tool: str  # vps, make, script or pip
    text: str  # the command from its tool's name on, one line

    def __str__(self) -> str:
        return f"{self.doc}: {self.text}"


def _kind(tool: str, rest: str) -> str | None:
    """vps, make <target>, python scripts/x.py, pip install; None for other uses of those names."""
    if tool.startswith("python"):
        return "script" if rest.startswith("scripts/") else None
    if tool == "make":
        return "make" if re.match(r"[a-z][\w-]*(\s|$)", rest) else None
    if tool == "pip":
        return "pip" if rest.startswith("install") else None
    return tool


def _commands_in(text: str, doc: str) -> list[Command]:
    found = []
    for segment in SEGMENT.split(text):
        m = COMMAND.search(segment.strip())
        kind = m and _kind(m["tool"], m["rest"].strip())
        if m and kind:
            found.append(Command(doc, kind, f"{m['tool']} {m['rest'].strip()}"))
    return found


@cache
def doc_commands() -> tuple[Command, ...]:
    commands: list[Command] = []
    for path in DOCS:
        doc, text = path.relative_to(ROOT).as_posix(), path.read_text()
        for lang, body in FENCE.findall(text):
            if lang in ("bash", "sh", "shell"):
                for line in body.replace("\\\n", " ").splitlines():
                    commands += _commands_in(line, doc)
        for span in SPAN.findall(FENCE.sub("", text)):
            commands += _commands_in(" ".join(span.split()), doc)
    return tuple(dict.fromkeys(commands))


def commands(tool: str) -> list[Command]:
    return [c for c in doc_commands() if c.tool == tool]


def test_the_docs_show_commands_of_every_kind() -> None:
    """The parser finds what the docs hold: an empty parametrisation would pass without checking anything."""
    texts = {c.text for c in doc_commands()}
    shown = {
        "make demo",
        "make test",
        "make demo PORT=8080",
        "vps serve --host --port --workers --index-dir --model-dir",
    }
    assert shown <= texts, sorted(texts)
    assert len(commands("vps")) >= 10 and len(commands("script")) >= 8, sorted(texts)


def test_readme_starts_with_make_demo_and_make_test() -> None:
    block = FENCE.search((ROOT / "README.md").read_text())
    assert block is not None
    assert [line.split("#")[0].strip() for line in block[2].splitlines()] == ["make demo", "make test"]


# --- vps ----------------------------------------------------------------------------------------------------------


GROUPS = {"label"}  # `vps label import ...`: a group of subcommands


def _vps_parts(text: str) -> tuple[list[str], str | None, str]:
    """`vps --debug build-index --out x` -> (['--debug'], 'build-index', '--out x'); a placeholder subcommand
    (`vps --debug <command> ...`) gives None; a group's subcommand is `label import`."""
    tokens = text.split()[1:]
    globals_ = []
    while tokens and tokens[0].startswith("-"):
        globals_.append(tokens.pop(0))
    if tokens and re.fullmatch(r"[a-z][a-z-]*", tokens[0]):
        if tokens[0] in GROUPS and len(tokens) > 1:
            return globals_, f"{tokens[0]} {tokens[1]}", " ".join(tokens[2:])
        return globals_, tokens[0], " ".join(tokens[1:])
    return globals_, None, ""


def _help(args: list[str]) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, f"vps {' '.join(args)} --help exited {result.exit_code}: {result.output}"
    return result.output


def _in_help(option: str, help_text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text) is not None


def _alternatives(value: str | None) -> list[str]:
    """`faiss|hnswlib` or `<faiss|hnswlib>` -> both; a single value or a placeholder (`DIR`) -> none."""
    if value is None or "|" not in value:
        return []
    return [v for v in value.strip("<>[]'\"").split("|") if v]


@pytest.mark.parametrize("command", commands("vps"), ids=str)
def test_every_vps_command_runs_with_the_options_shown(command: Command) -> None:
    """`vps <sub> --help` exits 0 and lists every option shown; `--opt a|b` shows values it lists as choices."""
    globals_, sub, rest = _vps_parts(command.text)
    top_help = _help([])
    for option in globals_:
        assert _in_help(option, top_help), f"{command}: `vps --help` has no {option}"
    if sub is None:
        return
    help_text = _help(sub.split())
    for option, value in OPTION.findall(rest):
        assert _in_help(option, help_text), f"{command}: `vps {sub} --help` has no {option}:\n{help_text}"
        choices = _alternatives(value)
        if choices:
            listed = re.search(rf"(?<![\w-]){re.escape(option)} <([^>]*\|[^>]*)>", help_text)
            assert listed, f"{command}: `vps {sub} --help` lists no choices for {option}"
            missing = set(choices) - set(listed[1].split("|"))
            assert not missing, f"{command}: {option} does not accept {sorted(missing)} (<{listed[1]}>)"


# --- make ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", commands("make"), ids=str)
def test_every_make_target_exists(command: Command) -> None:
    """`make -n` (print, run nothing) knows the target; a `VAR=value` the docs pass changes what it runs."""
    args = command.text.split()[1:]
    result = subprocess.run(["make", "-n", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    for arg in args:
        if "=" in arg:
            value = arg.split("=", 1)[1]
            assert value in result.stdout, f"{command}: {arg} changes nothing make would run:\n{result.stdout}"


def test_make_demo_serves_on_the_port_given_and_127_0_0_1() -> None:
    result = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", "PORT=8123"], capture_output=True, text=True)
    serve = [line for line in result.stdout.splitlines() if "vps serve" in line]
    assert serve and "--port 8123" in serve[-1] and "--host 127.0.0.1" in serve[-1], result.stdout


# --- scripts ------------------------------------------------------------------------------------------------------


@cache
def _script_help(name: str) -> str:
    path = ROOT / "scripts" / name
    if re.search(r"^\s*(import|from) torch\b", path.read_text(), re.M) and find_spec("torch") is None:
        pytest.skip(f"scripts/{name} imports torch at start-up and torch is not installed (pip install -e '.[train]')")
    result = subprocess.run(
        [sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"python scripts/{name} --help exited {result.returncode}: {result.stderr}"
    return result.stdout


@pytest.mark.parametrize("command", commands("script"), ids=str)
def test_every_script_exists_and_takes_the_options_shown(command: Command) -> None:
    script = command.text.split()[1]
    name = script.removeprefix("scripts/")
    assert (ROOT / script).is_file(), f"{command}: no {script}"
    help_text = _script_help(name)
    for option, _ in OPTION.findall(command.text):
        assert _in_help(option, help_text), f"{command}: `python {script} --help` has no {option}"


# --- pip extras ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", commands("pip"), ids=str)
def test_every_extra_installed_exists(command: Command) -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for group in re.findall(r"\.\[([\w,-]+)\]", command.text):
        for extra in group.split(","):
            assert extra in extras, f"{command}: pyproject.toml has no extra {extra!r} ({', '.join(extras)})"


# --- VPS_* names --------------------------------------------------------------------------------------------------


def _mentioned_names() -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for path in [*DOCS, *sorted((ROOT / "docs").glob("*/*.md"))]:
        for name in re.findall(r"\bVPS_[A-Z][A-Z0-9_]*", path.read_text()):
            names.setdefault(name.rstrip("_"), []).append(path.relative_to(ROOT).as_posix())
    return names


def test_every_vps_variable_the_docs_name_is_a_setting() -> None:
    names = _mentioned_names()
    assert "VPS_INDEX_DIR" in names and len(names) > 20, names
    fields = {f"VPS_{field.upper()}" for field in Settings.model_fields}
    unknown = {name: sorted(set(docs)) for name, docs in names.items() if name not in fields | NOT_SETTINGS.keys()}
    assert not unknown, f"VPS_* names that are no setting (app/service/config.py): {unknown}"


@pytest.mark.parametrize("name", sorted(NOT_SETTINGS))
def test_each_variable_that_is_no_setting_is_read_where_listed(name: str) -> None:
    assert name not in {f"VPS_{field.upper()}" for field in Settings.model_fields}, f"{name} is a setting now"
    assert name in (ROOT / NOT_SETTINGS[name]).read_text(), f"{NOT_SETTINGS[name]} does not read {name}"
    assert name in _mentioned_names(), f"{name} is mentioned in no doc: drop it from NOT_SETTINGS"


# --- where the build's figures are --------------------------------------------------------------------------------


def test_the_router_figures_the_docs_name_are_in_the_manifests_router_report(faiss_index: Path) -> None:
    """Router figures live in the manifest's `router_report` (also `index.router` in GET /v1/info), not in
    build_report.json, which holds what was indexed and what was not."""
    version = faiss_index / (faiss_index / "CURRENT").read_text().strip()
    report = json.loads((version / "manifest.json").read_text())["router_report"]
    build_report = json.loads((version / "build_report.json").read_text())
    text = "\n".join(path.read_text() for path in DOCS)
    named = set(re.findall(r"(?:router_report|index\.router)\.(\w+)", text))
    runbook = (ROOT / "docs" / "deploy.md").read_text()
    start = runbook.index("jq .router_report")
    named |= set(re.findall(r"`(\w+)`", runbook[start : runbook.index("the shards:", start)]))
    assert {"policy_reason", "router_top1", "probe_mass"} <= named, named
    assert named <= report.keys(), f"not in router_report: {sorted(named - report.keys())}"
    assert not named & build_report.keys()
    indexed = ("images_total", "images_embedded", "skus_total", "skus_indexed", "lost_skus", "problems")
    assert set(indexed) <= build_report.keys(), build_report.keys()
