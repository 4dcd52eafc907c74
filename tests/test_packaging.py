"""The installable package: a wheel built from pyproject.toml holds every pipeline package, so a non-editable
install runs what a checkout runs (`python -m pipeline.study`, `python -m pipeline.plan`, the stages' imports)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_package_of_the_library(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO / "pipeline", source / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True)
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    packaged = {Path(name).parent.as_posix() for name in zipfile.ZipFile(wheel).namelist()
                if name.startswith("pipeline/") and name.endswith("/__init__.py")} | {"pipeline"}
    packages = {init.parent.relative_to(REPO).as_posix() for init in (REPO / "pipeline").rglob("__init__.py")}
    assert packages <= packaged, f"missing from the wheel: {sorted(packages - packaged)}"
    assert {"pipeline/plan", "pipeline/study", "pipeline/config"} <= packages
