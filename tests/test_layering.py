"""The library's imports point one way, the way README's module map documents: each concern (a subpackage, or a
top-level module) imports only concerns of a lower layer, and no module imports one that imports it back. Read
from the source (imports inside functions included), so a wrong-way import fails here before it bites at runtime."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(tree: ast.AST) -> Set[str]:
    """Every `pipeline...` name an import statement mentions, with `from a import b` giving both `a` and `a.b`."""
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "pipeline" or name.startswith("pipeline.")}


def import_graph() -> Dict[str, Set[str]]:
    """Module → the library modules it imports."""
    sources = {_module_name(path): path for path in PACKAGE_ROOT.rglob("*.py")}
    return {module: {name for name in _imported_names(ast.parse(path.read_text())) if name in sources and name != module}
            for module, path in sources.items()}


# README's module map, lowest layer first; a concern may import only concerns of strictly lower layers.
LAYERS: List[Set[str]] = [
    {"errors", "files", "fingerprint", "progress", "hooks", "cuda_graphs"},
    {"config", "storage", "threads"},
    {"runtime", "data", "models", "pruning", "tracking", "report"},
    {"training", "measure"},
    {"checkpoint", "methods"},
    {"settings"},
    {"settings_files"},
    {"stage"},
    {"plan"},
    {"preflight", "experiment"},
    {"study"},
]


def layer_of(unit: str) -> int:
    name = unit.removeprefix("pipeline.")
    for level, names in enumerate(LAYERS):
        if name in names:
            return level
    raise AssertionError(f"'{unit}' has no layer: add it to LAYERS here and to the module map in README.md")


def wrong_way_imports(units: Dict[str, Set[str]]) -> List[str]:
    """Every `a → b` where b is not in a lower layer than a."""
    return [f"{unit} → {imported}" for unit, imports in sorted(units.items()) if unit != "pipeline"
            for imported in sorted(imports) if layer_of(imported) >= layer_of(unit)]


def _unit(module: str) -> str:
    """The concern a module belongs to: its subpackage (`pipeline.training`), or itself when it is top-level."""
    parts = module.split(".")
    return ".".join(parts[:2])


def unit_graph(modules: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    units: Dict[str, Set[str]] = {}
    for module, imported in modules.items():
        edges = units.setdefault(_unit(module), set())
        edges.update(_unit(name) for name in imported if _unit(name) != _unit(module) and name != "pipeline")
    return units


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle of `graph` as a path that returns to its start, or None."""
    visiting: List[str] = []
    done: Set[str] = set()

    def visit(node: str) -> Optional[List[str]]:
        visiting.append(node)
        for following in sorted(graph.get(node, ())):
            if following in visiting:
                return visiting[visiting.index(following):] + [following]
            if following not in done:
                cycle = visit(following)
                if cycle:
                    return cycle
        visiting.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_real_imports():
    modules = import_graph()
    assert "pipeline.hooks" in modules["pipeline.pruning.regularizer"]
    assert "pipeline.models.registry" in modules["pipeline.models.cifar_resnet"]


def test_find_cycle_reports_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle between modules: {' → '.join(cycle)}"


def test_no_subpackage_imports_one_that_imports_it_back():
    cycle = find_cycle(unit_graph(import_graph()))
    assert cycle is None, f"import cycle between concerns: {' → '.join(cycle)}"


def test_wrong_way_imports_are_reported():
    assert wrong_way_imports({"pipeline.pruning": {"pipeline.training", "pipeline.config"}}) == [
        "pipeline.pruning → pipeline.training"]
    assert wrong_way_imports({"pipeline.training": {"pipeline.measure"}}) == ["pipeline.training → pipeline.measure"]


def test_every_concern_imports_only_lower_layers():
    wrong = wrong_way_imports(unit_graph(import_graph()))
    assert not wrong, f"imports against the documented direction (README's module map): {wrong}"
