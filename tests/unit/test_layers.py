"""The import contract: layers that only import downwards, and no import cycles.

import-linter cannot read this tree: its graph builder walks one directory per
package, and freshet maps the design card's folders (stream/, serving/, monitor/,
training/) into the freshet namespace. So the contract is checked here, from the
source's own import statements (function-level imports included), the same way.
"""

from __future__ import annotations

import ast
import functools
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Where each package of the freshet namespace lives (pyproject.toml's package-dir).
PACKAGE_DIRS = {
    "freshet": ROOT / "freshet",
    "freshet.stream": ROOT / "stream",
    "freshet.serving": ROOT / "serving",
    "freshet.monitor": ROOT / "monitor",
    "freshet.training": ROOT / "training",
}

# Top to bottom. A module may import modules of its own layer entry or of any layer
# below it, never above. Entries in one tuple are independent siblings: neither
# imports the other. Core is every freshet.* module not named by a higher layer.
LAYERS: list[tuple[str, ...]] = [
    ("freshet.cli",),                                      # composition root: the command table
    ("freshet.demo",),                                     # the demo and its workload simulator
    ("freshet.app",),                                      # application shell: stack, up, apply
    ("freshet.training",),                                 # training set, fit, evaluate, register
    ("freshet.stream", "freshet.serving", "freshet.monitor"),  # the engines
    ("freshet",),                                          # core: settings, contracts, Kafka, Redis layout, registries
]


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """freshet modules this module imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _layer_of(module: str) -> tuple[int, str]:
    for depth, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + "."):  # higher layers match first
                return depth, entry
    raise AssertionError(f"{module} is in no layer")


@functools.cache
def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_package_folder_installs_under_the_freshet_namespace():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    assert all(name == "freshet" or name.startswith("freshet.") for name in listed)
    assert {k: ROOT / v for k, v in setuptools["package-dir"].items()} == \
        {k: v for k, v in PACKAGE_DIRS.items() if k != "freshet"}
    on_disk = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert on_disk == listed, "packages on disk but not in pyproject.toml (left out of the wheel), or gone"


def test_no_import_runs_up_a_layer_or_across_independent_siblings():
    bad = []
    for module, imported in _graph().items():
        depth, entry = _layer_of(module)
        for target in imported:
            t_depth, t_entry = _layer_of(target)
            if t_depth < depth or (t_depth == depth and t_entry != entry):
                bad.append(f"{module} imports {target} ({t_entry} is not below {entry})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles_between_modules():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                cycles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", [entry for entries in LAYERS for entry in entries])
def test_every_layer_has_modules(layer):
    assert any(m == layer or m.startswith(layer + ".") for m in _graph())
