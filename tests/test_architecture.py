"""The import contract of gateway/'s packages (gateway/__init__.py draws it): each layer
imports only the layers below it, and no module imports itself back through others, not
even for type checking."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "gateway"

# Each layer and those it may import, besides itself. The top-level modules that are not
# the process's own are the base.
PROCESS = {"gateway.app", "gateway.cli", "gateway.server", "gateway.workers", "gateway.__main__"}
MAY_IMPORT = {
    "process": {"http", "spool", "kafka", "limits", "keys", "base"},
    "http": {"limits", "keys", "base"},
    "spool": {"base"},
    "kafka": {"base"},
    "limits": {"keys", "base"},
    "keys": {"base"},
    "base": set(),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(module: str) -> str:
    if module in PROCESS:
        return "process"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in MAY_IMPORT and (ROOT / parts[1]).is_dir():
        return parts[1]
    return "base"


def imports(module: str) -> Iterator[tuple[int, str]]:
    """Every gateway module `module` imports: (line, imported module)."""
    return imports_in(MODULES[module].read_text(encoding="utf-8"), module)


def imports_in(source: str, module: str) -> Iterator[tuple[int, str]]:
    """The gateway modules `source` imports, wherever the import is (in a function, or
    under TYPE_CHECKING)."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "gateway":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            assert node.level == 0, f"{module}:{node.lineno}: a relative import"
            if node.module.split(".")[0] != "gateway":
                continue
            for alias in node.names:
                # `from gateway.http import access` imports the module gateway.http.access.
                submodule = f"{node.module}.{alias.name}"
                yield node.lineno, submodule if submodule in MODULES else node.module


GRAPH = {module: {target for _, target in imports(module)} for module in MODULES}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_module_imports_only_the_layers_below_it(module: str) -> None:
    allowed = MAY_IMPORT[layer(module)] | {layer(module)}
    wrong = [
        f"line {line}: {target} ({layer(target)})"
        for line, target in imports(module)
        if layer(target) not in allowed
    ]
    assert not wrong, f"{module} ({layer(module)}) may import only {sorted(allowed)}: {wrong}"


def test_no_module_imports_itself_back() -> None:
    # Tarjan's strongly connected components: any of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in GRAPH[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in GRAPH[module]:
                cycles.append(sorted(component))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not cycles, f"modules that import each other: {cycles}"


def test_the_walk_finds_imports_in_functions_and_for_type_checking() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gateway.kafka.sink import KafkaSink\n"
        "def late():\n    from gateway.http import ingest\n"
        "import gateway.keys.model\n"
    )
    found = {target for _, target in imports_in(source, "gateway.spool.sink")}
    assert found == {"gateway.kafka.sink", "gateway.http.ingest", "gateway.keys.model"}
    assert {layer(t) for t in found} == {"kafka", "http", "keys"}
    assert layer("gateway.app") == "process" and layer("gateway.config") == "base"


@pytest.mark.parametrize("package", sorted(p.parent.name for p in ROOT.glob("*/__init__.py")))
def test_each_package_says_what_it_owns_and_may_import(package: str) -> None:
    init = ROOT / package / "__init__.py"
    assert init.exists(), f"gateway/{package}/ has no __init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    assert doc, f"gateway/{package}/__init__.py has no docstring"
    assert "May import" in doc, f"gateway/{package}/__init__.py does not say what it may import"


# The tests, the benchmarks and what they share (tests/support/, devkit/).
REPO = ROOT.parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _test_files() -> list[Path]:
    return sorted(
        p
        for p in (REPO / "tests").rglob("*.py")
        if p.name.startswith("test_") or p.name == "conftest.py"
    )


@pytest.mark.parametrize("path", _test_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_a_test_file_imports_no_other_test_file(path: Path) -> None:
    wrong = sorted(
        name
        for name in _imported_modules(path)
        if name.startswith("tests.")
        and (name.rsplit(".", 1)[-1].startswith("test_") or name.endswith("conftest"))
    )
    assert not wrong, f"{path.name} imports test files: {wrong} (shared helpers: tests/support/)"


@pytest.mark.parametrize(
    ("folder", "other"),
    [
        ("loadtest", "tests"),
        ("tests", "loadtest"),
        ("devkit", "tests"),
        ("devkit", "loadtest"),
        ("gateway", "tests"),
        ("gateway", "loadtest"),
        ("gateway", "devkit"),
    ],
)
def test_the_benchmarks_the_tests_and_the_gateway_keep_apart(folder: str, other: str) -> None:
    wrong = [
        f"{path.relative_to(REPO)}: {name}"
        for path in sorted((REPO / folder).rglob("*.py"))
        for name in _imported_modules(path)
        if name == other or name.startswith(f"{other}.")
    ]
    assert not wrong, f"{folder}/ imports {other}/ (shared code goes in devkit/): {wrong}"
