"""The layout shows the architecture, and these checks keep it so: imports point down (artifacts <- engine <-
catalogue <- service / offline <- cli), the service never imports offline code, no import cycles, and no long
functions."""

from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"
MAX_FUNCTION_LINES = 60

# What each layer may import (app.errors is shared by all; cli is the top).
ALLOWED = {
    "errors": set(),
    "artifacts": {"errors", "artifacts"},
    "engine": {"errors", "artifacts", "engine"},
    "catalogue": {"errors", "artifacts", "engine", "catalogue"},
    "service": {"errors", "artifacts", "engine", "catalogue", "service"},
    "offline": {"errors", "artifacts", "engine", "catalogue", "offline"},
    "cli": {"errors", "artifacts", "engine", "catalogue", "service", "offline", "cli"},
}


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(APP.parent).with_suffix("").parts): p for p in APP.rglob("*.py")}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else "cli"


def _imports(path: Path) -> set[str]:
    """Every app module imported anywhere in the file (inside functions and TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("app."))
    return found


def test_every_module_is_in_a_layer() -> None:
    for module in _modules():
        if module in ("app", "app.__init__"):
            continue
        assert _layer(module).removesuffix(".__init__") in ALLOWED or module == "app.cli", module


def test_imports_point_down() -> None:
    bad = []
    for module, path in _modules().items():
        own = "cli" if module == "app.cli" else _layer(module)
        for imported in _imports(path):
            if _layer(imported) not in ALLOWED.get(own, set()):
                bad.append(f"{module} imports {imported}")
    assert bad == []


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_functions_are_short_or_say_why() -> None:
    """A function longer than MAX_FUNCTION_LINES carries a `# long:` comment (the reason) on the line above."""
    long = []
    for path in APP.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES and "# long:" not in lines[first - 2]:
                    long.append(f"{path.relative_to(APP.parent)}:{node.lineno} {node.name} ({size} lines)")
    assert long == []


def test_search_stages_are_functions_of_the_engine() -> None:
    from app.engine.search import STAGES, SearchEngine

    for stage in ("route", "search", "group"):
        assert stage in STAGES and callable(getattr(SearchEngine, stage))
    assert callable(SearchEngine.embed_image)  # decode + embed
