"""The package's shape: no import cycle between its modules, and each layer imports only from the layers
below it (the layer map in docs/development.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "vae_hf"

# Lowest first. A module may import from its own layer and from lower ones, never from a higher one.
LAYERS = [
    {"vae_hf.errors", "vae_hf.config", "vae_hf.losses", "vae_hf.offline"},
    {"vae_hf.io"},
    {"vae_hf.models", "vae_hf.data", "vae_hf.game"},
    {"vae_hf.analysis"},
    {"vae_hf.train", "vae_hf.parallel"},
    {"vae_hf.perf"},
    {"vae_hf.cli", "vae_hf.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from vae_hf.data import loader` imports the submodule `vae_hf.data.loader`
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        # importing a submodule runs its packages' __init__ first; those are checked as modules of their own
        graph[name] = {target for target in imported_modules(path, known) if target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of module names (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target) :] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def layer_of(module: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and graph["vae_hf.train.trainer"]  # the walk found the package and its imports
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    """Control: the check above can fail."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if target != "vae_hf" and layer_of(source) is not None and layer_of(target) > layer_of(source)
    )


def test_every_module_has_a_layer_and_imports_only_downward():
    graph = import_graph()
    unplaced = sorted(name for name in graph if name != "vae_hf" and layer_of(name) is None)
    assert not unplaced, f"modules outside the layer map: {unplaced}"
    upward = upward_imports(graph)
    assert not upward, "imports from a higher layer: " + ", ".join(upward)


def test_the_layer_check_finds_an_upward_import():
    """Control: a model module importing the trainer would be reported."""
    graph = {"vae_hf.models.vae": {"vae_hf.train.trainer", "vae_hf.config"}, "vae_hf.train.trainer": set()}
    assert upward_imports(graph) == ["vae_hf.models.vae -> vae_hf.train.trainer"]


@pytest.mark.parametrize("package", ["models", "data", "train", "parallel", "io", "analysis", "cli", "perf"])
def test_the_layer_map_in_the_docs_names_each_package(package):
    development = (ROOT / "docs" / "development.md").read_text()
    assert f"{package}/" in development
    for path in (PACKAGE / package).glob("*.py"):
        if path.name != "__init__.py":
            assert path.name in development, f"docs/development.md does not name {package}/{path.name}"
