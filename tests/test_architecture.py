"""The package's architecture, checked from its source: rooms on floors, every import pointing
down, no import circle.

A room is a subpackage of spannorm_megatron (or a top-level module). Each room sits on a floor,
and may import only rooms on lower floors: the model never reaches for training, the runtime
never for the patches or the model, training never for the HF converters. Function-level
imports count too (an import moved into a function still ties the two modules together). A new
room must be given its floor here, which is the point: where it sits is a decision.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "spannorm_megatron"
SOURCE = Path(__file__).resolve().parents[1] / PACKAGE

# Lowest first. The package root holds only its version and warning filters.
FLOORS = [
    {"machine"},                       # what the machine has (the package's import asks it)
    {PACKAGE, "errors"},
    # the norm registry, the error boundary, process lifetimes (none imports torch at import
    # time)
    {"placements", "cli", "orphans"},
    {"config"},                        # the typed configuration sections
    {"runtime"},                       # device, process groups
    {"model", "data", "process"},      # megatron-core layer specs; datasets; patch sets
    {"checkpoint", "metrics"},
    {"training"},                      # the Trainer and its loop
    {"hf", "lab", "selfcheck"},        # conversion, experiments, the install check
    {"evaluation"},                    # scores Megatron and HF models alike
    {"train", "benchmarks"},           # spannorm-train; speed and memory measured
]
FLOOR = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def _modules() -> dict:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


def _imports(modules: dict) -> dict:
    """module -> the package's modules it imports (at any depth of its code)."""
    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.startswith(PACKAGE) else ""
                if found and found != module:
                    graph[module].add(found)
    return graph


MODULES = _modules()
GRAPH = _imports(MODULES)


def test_every_room_has_a_floor():
    rooms = {_room(module) for module in MODULES} - {"patches"}
    assert rooms - FLOOR.keys() == set(), "give each new room its floor in FLOORS"


def _upward(graph: dict, room: str) -> list:
    return sorted(
        f"{module} imports {target} (floor {FLOOR[_room(target)]} >= {FLOOR[room]})"
        for module, targets in graph.items() if _room(module) == room
        for target in targets
        if _room(target) != room and FLOOR.get(_room(target), -1) >= FLOOR[room])


@pytest.mark.parametrize("room", sorted({_room(m) for m in MODULES} & FLOOR.keys()))
def test_imports_point_down(room):
    assert _upward(GRAPH, room) == []


def _circles(graph: dict) -> list:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_no_import_circle():
    assert _circles(GRAPH) == []


def test_the_runtime_never_imports_the_patches():
    """patches/ depends on runtime.device; only spannorm_megatron.process applies a patch set."""
    importers = sorted(
        module for module, path in MODULES.items()
        if "patches" in path.read_text(encoding="utf-8") and _room(module) == "runtime"
        and any(isinstance(node, (ast.Import, ast.ImportFrom)) and "patches" in ast.dump(node)
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))))
    assert importers == []


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    """Not vacuous: in a planted tree, a function-level import of training from the model and a
    relative import back, closing a circle, are both found."""
    files = {
        "model/layer.py": "def f():\n    from spannorm_megatron.training import loop\n",
        "training/loop.py": "from ..model import layer\n",
        "training/__init__.py": "",
        "model/__init__.py": "",
    }
    modules = {}
    for name, text in files.items():
        path = tmp_path / PACKAGE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        dotted = ".".join([PACKAGE, *Path(name).with_suffix("").parts])
        modules[dotted.removesuffix(".__init__")] = path
    graph = _imports(modules)
    assert graph[f"{PACKAGE}.training.loop"] == {f"{PACKAGE}.model.layer"}
    assert _upward(graph, "model") == [
        f"{PACKAGE}.model.layer imports {PACKAGE}.training.loop "
        f"(floor {FLOOR['training']} >= {FLOOR['model']})"]
    assert _circles(graph) == [[f"{PACKAGE}.model.layer", f"{PACKAGE}.training.loop"]]
    assert _upward(GRAPH, "runtime") == [] and GRAPH[f"{PACKAGE}.process"] >= {
        f"{PACKAGE}.runtime"}


def test_code_and_docs_name_behaviour_not_tracker_numbers():
    """A tracker number says nothing to a reader of the code (and the tracker may move). An
    upstream project's issue, cited with the project's name, is a reference, not ours."""
    import re

    root = SOURCE.parent
    pattern = re.compile(r"\b[Ii]ssues? #?\d+|\bissue-\d+")
    found = []
    for folder in ("spannorm_megatron", "tools", "tests", "examples", "docs", "patches"):
        for path in (root / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".sh", ".yaml", ".txt") and path.is_file():
                for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
                    if pattern.search(line) and "Megatron-LM" not in line:
                        found.append(f"{path.relative_to(root)}:{number}: {line.strip()[:80]}")
    found += [f"README.md: {line[:80]}" for line in (root / "README.md").read_text().splitlines()
              if pattern.search(line)]
    assert found == []
