"""The layout rules of STYLE.md, checked on the source tree (no broker, no import).

* no import cycles anywhere in ``src/msight_core`` (every import statement counts,
  inside functions and ``TYPE_CHECKING`` blocks too; a package ``__init__``
  importing its own submodules is not a cycle);
* a backend's private package (``pubsub/_redis``, ``_nats``, ``_kafka``) is imported
  only by its own modules, its public facade and the test harness;
* the CLI and ``utils.py`` reach the backends through public API and ``config.py`` only;
* no class chooses another class in ``__new__``; modules in ``pubsub/`` stay small.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "src" / "msight_core"
MAX_PUBSUB_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of the package that ``name`` imports, wherever the statement is."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            if node.level > 1:
                base = base[: len(base) - (node.level - 1)]
            if node.level:
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if MODULES[v].name == "__init__.py" and w.startswith(v + "."):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    # The check above must be able to fail: a two-module loop is reported.
    saved = dict(GRAPH)
    try:
        GRAPH["msight_core.config"] = {"msight_core.errors"}
        GRAPH["msight_core.errors"] = {"msight_core.config"}
        assert ["msight_core.config", "msight_core.errors"] in _cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


@pytest.mark.parametrize("backend", ["redis", "nats", "kafka", "shm"])
def test_private_backend_package_is_reached_only_through_its_facade(backend: str) -> None:
    private = f"msight_core.pubsub._{backend}"
    assert private in MODULES, f"{private} is missing"
    allowed = (private, f"msight_core.pubsub.{backend}", "msight_core.testing")
    offenders = sorted(
        name
        for name, deps in GRAPH.items()
        if not name.startswith(allowed)
        and any(d == private or d.startswith(private + ".") for d in deps)
    )
    assert offenders == []


def test_cli_and_utils_use_public_api_only() -> None:
    users = [n for n in MODULES if n.startswith("msight_core.cli") or n == "msight_core.utils"]
    offenders = {
        name: sorted(d for d in GRAPH[name] if d.startswith("msight_core.pubsub._"))
        for name in users
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_new_returning_another_class() -> None:
    offenders = [
        f"{name}.{node.name}"
        for name, path in MODULES.items()
        for cls in ast.walk(ast.parse(path.read_text()))
        if isinstance(cls, ast.ClassDef)
        for node in cls.body
        if isinstance(node, ast.FunctionDef) and node.name == "__new__"
    ]
    assert offenders == []


def test_pubsub_modules_stay_small() -> None:
    sizes = {
        name: len(path.read_text().splitlines())
        for name, path in MODULES.items()
        if name.startswith("msight_core.pubsub")
    }
    assert {n: s for n, s in sizes.items() if s > MAX_PUBSUB_LINES} == {}


@pytest.mark.parametrize("package", ["_redis", "_nats", "_kafka", "_shm"])
def test_each_backend_package_says_what_lives_there(package: str) -> None:
    init = ROOT / "pubsub" / package / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    assert "only" in doc and len(doc) > 200, doc
