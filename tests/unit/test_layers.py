"""The packages point one way: a walk over every import in harness/ (module level and inside functions)
finds no cycle between packages, and the training engine (harness/core) imports no tracking code."""

import ast
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[2] / "harness"
# What the training engine may import: itself, the pure measurements, and the leaf modules every layer uses.
ENGINE_MAY_IMPORT = {"core", "measure", "console", "errors", "faults", "signals"}


def unit_of(module: str) -> str:
    """The package (harness/<package>/) or top-level module (harness/<module>.py) a dotted name belongs to."""
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """Each harness module's unit -> the units of the harness modules it imports."""
    edges: dict[str, set[str]] = {}
    for path in HARNESS.rglob("*.py"):
        module = ".".join(("harness", *path.relative_to(HARNESS).with_suffix("").parts))
        if module.endswith("__init__") and module.count(".") == 1:
            continue
        found = edges.setdefault(unit_of(module), set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                top = name.split(".")[0]
                if top == "harness" and name != "harness":
                    unit = unit_of(name)
                    if (HARNESS / unit).is_dir() or (HARNESS / f"{unit}.py").exists():
                        found.add(unit)
                elif top in ("mlflow", "ray"):
                    found.add(top)
    return {unit: targets - {unit} for unit, targets in edges.items()}


def cycle(edges: dict[str, set[str]]):
    """A cycle of units as a list (first == last), or None."""
    state: dict[str, str] = {}

    def visit(unit, path):
        state[unit] = "open"
        for target in sorted(edges.get(unit, ())):
            if state.get(target) == "open":
                return path + [unit, target]
            if target not in state and (found := visit(target, path + [unit])):
                return found
        state[unit] = "done"
        return None

    for unit in sorted(edges):
        if unit not in state and (found := visit(unit, [])):
            return found
    return None


def test_no_cycle_between_packages():
    assert cycle(imports()) is None


@pytest.mark.parametrize("edges,expected", [({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
                                            ({"a": {"b"}, "b": {"c"}, "c": set()}, None)])
def test_the_walk_finds_a_cycle_where_there_is_one(edges, expected):
    assert cycle(edges) == expected


def test_the_engine_imports_neither_tracking_nor_mlflow_nor_ray():
    assert imports()["core"] <= ENGINE_MAY_IMPORT
