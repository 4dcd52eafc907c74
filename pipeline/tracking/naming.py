"""Where runs go and what they are called: the store, the experiment, the key that groups a pipeline execution's
stage runs (each stage is its own process), and the settings a run is named by."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

from pipeline.config import project_root

DEFAULT_EXPERIMENT = "tpp-pipeline"
PIPELINE_KEY_TAG = "tpp.pipeline_key"
STAGE_TAG = "tpp.stage"
REMOTE_SCHEMES = ("http", "https", "databricks")
DVC_EXPERIMENTS_FOLDER = ".dvc/tmp/exps"
INVALID_KEY_CHARACTERS = re.compile(r"[^\w./\- :]")


def tracking_root() -> Path:
    """The repository whose store gets the runs; a queued DVC experiment's temporary copy maps to its repo."""
    root = project_root()
    for folder in root.parents:
        if folder.match(DVC_EXPERIMENTS_FOLDER):
            return folder.parent.parent.parent
    return root


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store at the repository root so every stage shares it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str, root: Path) -> str | None:
    """Where a new experiment keeps artifacts: `<root>/mlartifacts`, unless a server manages its own."""
    if is_remote(uri):
        return None
    return (root / "mlartifacts").as_uri()


def experiment_name() -> str:
    """MLFLOW_EXPERIMENT_NAME if set, else the project's experiment."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def pipeline_key() -> str:
    """What all stages of one pipeline execution share, to find their parent run across processes.

    Quotes and backslashes become '_' because the key is matched inside a quoted MLflow search filter.
    """
    key = (os.environ.get("TPP_PIPELINE_RUN") or os.environ.get("DVC_EXP_NAME")
           or f"{socket.gethostname()}:{os.getpgid(0)}")
    return re.sub(r"['\"\\]", "_", key)


@dataclass(frozen=True)
class RunGroup:
    """The parent run that stage runs nest under: found across processes by `key`, named '<label> <run id>'."""

    key: str
    label: str
    experiment: str
    named_by_settings: bool = False


def pipeline_group() -> RunGroup:
    """The group of one pipeline execution: its stages, each a separate process, share `pipeline_key()`."""
    return RunGroup(pipeline_key(), "pipeline", experiment_name(), named_by_settings=True)


# What defines a pipeline run, in the order a person reads it: (tag, settings path, label in the run's name).
DEFINING_SETTINGS = (("tpp.model", ("model", "name"), ""), ("tpp.data", ("data", "name"), ""),
                     ("tpp.method", ("prune", "method"), ""), ("tpp.ratio", ("prune", "ratio"), ""),
                     ("tpp.round_to", ("prune", "round_to"), "round "), ("tpp.lr", ("retrain", "lr"), "lr "))


def defining_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """The settings that tell runs apart (model, data, method, ratio, alignment, retraining LR), as tags: those of
    them that `params` holds, nested (`{"model": {"name": ...}}`) or by dotted key (`{"model.name": ...}`)."""
    flat = flatten_params(params)
    return {tag: flat[".".join(path)] for tag, path, _ in DEFINING_SETTINGS if ".".join(path) in flat}


def run_name(tags: Mapping[str, str]) -> str | None:
    """A run's name from its defining tags, e.g. 'resnet56 digits tpp 0.9 lr 0.01' ('round 8' only when
    aligned), so the MLflow run list reads as the experiments it holds."""
    if not tags:
        return None
    parts = [f"{label}{tags[tag]}" for tag, _, label in DEFINING_SETTINGS
             if tag in tags and not (tag == "tpp.round_to" and tags[tag] == "1")]
    return " ".join(parts)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys (prune.reg.alpha), string values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[mlflow_key(name)] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return flat


def mlflow_key(name: str) -> str:
    """A key MLflow accepts: characters it refuses (such as '*' in layer patterns) become '_'."""
    return INVALID_KEY_CHARACTERS.sub("_", name)


def is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme in REMOTE_SCHEMES
