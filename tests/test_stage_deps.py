"""Every library module a stage runs is one of its `deps` in dvc.yaml, so that editing it reruns the stage.

dvc.yaml's deps are written by hand; a new import would otherwise make DVC miss a code change and keep outputs the
new code would not produce. The import closure is read from the source (imports inside functions included),
starting at the stage's script and following `pipeline` modules and the packages they sit in.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# Presentation only: what they do never changes a stage's outputs, so editing them reruns nothing (dvc.yaml's
# header says the same). Their own imports are not followed.
PRESENTATION = ("pipeline/tracking/", "pipeline/progress.py", "pipeline/storage.py")


def presentation(relative: str) -> bool:
    """Whether a repository-relative file is presentation only (a listed module, or inside a listed folder)."""
    return any(relative == entry or (entry.endswith("/") and relative.startswith(entry)) for entry in PRESENTATION)


def module_file(name: str) -> Path | None:
    """The source file of a `pipeline...` module or package, or None when the name is no module (an attribute)."""
    path = REPO.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_files(source: Path) -> Set[Path]:
    """The `pipeline` files that `source` imports, with `from a import b` meaning module `a.b` when it is one."""
    found: Set[Path] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "pipeline":
                parts = name.split(".")
                found.update(file for file in (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1))
                             if file is not None)
    return found


def only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return len(body) <= 1 and all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                                  for node in body)


def import_closure(script: Path) -> Set[str]:
    """Repository-relative paths of every library file the script runs, presentation modules and docstring-only
    `__init__`s left out."""
    seen: Set[Path] = set()
    pending = [script]
    while pending:
        for imported in imported_files(pending.pop()):
            relative = str(imported.relative_to(REPO))
            if imported not in seen and not presentation(relative):
                seen.add(imported)
                pending.append(imported)
    return {str(path.relative_to(REPO)) for path in seen if not only_a_docstring(path)}


def uncovered(files: Set[str], deps: List[str]) -> List[str]:
    """Files no dependency covers (a dependency covers itself and, as a folder, everything under it)."""
    return sorted(file for file in files
                  if not any(file == dep or file.startswith(dep.rstrip("/") + "/") for dep in deps))


def stages() -> Dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_the_closure_follows_imports_through_modules_and_packages():
    closure = import_closure(REPO / "stages/prune.py")
    assert {"pipeline/methods.py", "pipeline/pruning/regularizer.py", "pipeline/hooks.py",
            "pipeline/training/step.py", "pipeline/data/__init__.py"} <= closure
    assert "pipeline/__init__.py" not in closure and not any(presentation(file) for file in closure)
    assert uncovered({"pipeline/data/loaders.py", "pipeline/hooks.py"}, ["pipeline/data"]) == ["pipeline/hooks.py"]


@pytest.mark.parametrize("stage", sorted(stages()))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage: str):
    definition = stages()[stage]
    script = re.fullmatch(r"python (stages/\w+\.py)", definition["cmd"]).group(1)
    deps = [str(dep) for dep in definition["deps"]]
    assert script in deps
    missing = uncovered(import_closure(REPO / script), deps)
    assert not missing, (f"stage '{stage}' runs {missing} but dvc.yaml does not list them as deps: editing them "
                         f"would not rerun it. Add them to its deps (or, if they only present results, to "
                         f"PRESENTATION here and to dvc.yaml's header).")
