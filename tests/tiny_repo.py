"""A git + DVC copy of the project with the embedded digits data and a tiny experiment, run like a user would.

Shared by the end-to-end tests (pipeline, resume, distributed): each makes its own copy, so they can run in any
order and in parallel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRACKED = ["pipeline", "stages", "nets", ".dvc/config", ".dvcignore", ".gitignore", "dvc.yaml", "params.yaml",
           "data.dvc", "pyproject.toml"]
TINY = {"model.name": "resnet20", "pretrain.epochs": 2, "pretrain.milestones": [1], "prune.reg.delta": 0.25,
        "prune.reg.stabilize_steps": 6, "prune.ratio": 0.5, "retrain.epochs": 2, "retrain.milestones": [1],
        "evaluate.latency_repeats": 2, "evaluate.latency_batch_size": 16, "trainability.jsv_samples": 8}


def environment(**extra: str) -> Dict[str, str]:
    """The user's environment with the virtual environment first on PATH (PYTHONPATH set by callers to the copy, so
    its stages import the copy's own `pipeline`)."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", **extra}
    if "MLFLOW_TRACKING_URI" not in extra:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(command: Sequence[str], cwd: Path, check: bool = True, **env: str) -> Tuple[int, str]:
    """Run a command like a user would; fail with its output when `check` and it exits non-zero."""
    result = subprocess.run(list(command), cwd=cwd, env=environment(PYTHONPATH=str(cwd), **env),
                            capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{output[-4000:]}")
    return result.returncode, output


def set_params(repo: Path, changes: Mapping[str, Any]) -> None:
    """Edit dotted keys of the copy's params.yaml, as a user would by hand."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        section = params
        for key in parents:
            section = section[key]
        section[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_repo(root: Path, changes: Mapping[str, Any] = TINY) -> Path:
    """Copy the tracked project files into `root`, write the digits data, apply `changes`, commit."""
    for name in TRACKED:
        source, target = REPO / name, root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    run([sys.executable, "-m", "pipeline.data", "digits", "--root", "data"], root)
    set_params(root, changes)
    run([sys.executable, "stages/validate.py"], root)  # the settings files a stage script run alone reads
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny experiment"], root)
    return root


def stages_ran(output: str) -> set:
    return set(re.findall(r"Running stage '(\w+)'", output))


def locked_outputs(repo: Path) -> Dict[str, str]:
    """Every stage output recorded in dvc.lock, path → content hash."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"]: out.get("md5") for stage in lock["stages"].values() for out in stage.get("outs", [])}
