"""The DVC wiring of settings: which settings each stage reads, the resolved files the validate stage writes, and
how a stage reads its own file back.

validate is the only reader of params.yaml. It writes `settings/<stage>.json` (exactly what the stage reads, the
stage's declared DVC dependency) and `settings/run.json` (settings that change how a run proceeds but never what it
produces, so no stage depends on them). A stage builds its `Config` from those two files only, so what it ran with
is always what `dvc.lock` records, also under `dvc repro -s <stage>` after an edit of params.yaml. A section the
stage does not read is absent from its `Config`: reading it raises, so STAGE_SETTINGS cannot silently fall short.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence

import yaml

from pipeline.config import Config, config_from_mapping, config_to_dict
from pipeline.errors import ConfigError
from pipeline.settings import NAMED_SETTINGS, check_names

SETTINGS_DIR = Path("settings")
RUN_SETTINGS_FILE = "run"

# The settings each stage reads (dotted keys select part of a section). dvc.yaml's dependencies, the resolved
# settings files and the resume fingerprints all derive from this one table. evaluate's prune.ratio,
# prune.round_to and retrain.lr name the pipeline's MLflow run; they cost no rerun (they change its input models).
STAGE_SETTINGS: Dict[str, Sequence[str]] = {
    "pretrain": ("seed", "device", "amp", "trainer", "data", "model", "pretrain"),
    "prune": ("seed", "device", "amp", "trainer", "data", "prune"),
    "retrain": ("seed", "device", "amp", "trainer", "data", "retrain", "trainability"),
    "evaluate": ("seed", "device", "amp", "trainer", "data", "model.name", "model.factory", "prune.method",
                 "prune.ratio", "prune.round_to", "retrain.lr", "trainability", "evaluate"),
}
# Settings that change how a run proceeds but never what it produces: left out of what stages depend on.
RUN_ONLY_SETTINGS = ("trainer.checkpoint_every", "trainer.resume", "data.num_workers")


class UnreadSection:
    """Stands in a stage's `Config` for a section the stage's settings file leaves out, holding only the keys it
    does read: reading any other key is a bug (the stage would run with a value DVC does not track), said loudly."""

    def __init__(self, stage: str, section: str, values: Mapping[str, Any]) -> None:
        self.__dict__.update(values)
        self.__dict__["_where"] = (stage, section)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        stage, section = self.__dict__["_where"]
        raise RuntimeError(f"stage '{stage}' read '{section}.{name}', which is not in settings/{stage}.json: add it "
                           f"to STAGE_SETTINGS['{stage}'] in pipeline/settings_files.py so DVC tracks it.")


def stage_settings(config: Config, stage: str) -> Dict[str, Any]:
    """The resolved values of exactly the settings `stage` reads, without the run-only ones."""
    selected: Dict[str, Any] = {}
    for key in STAGE_SETTINGS[stage]:
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        plain = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        selected[key] = _without_run_only(plain, key)
    return selected


def run_settings(config: Config) -> Dict[str, Any]:
    """The run-only settings (`settings/run.json`), by dotted key."""
    return {key: _get(config_to_dict(config), key) for key in RUN_ONLY_SETTINGS}


def settings_texts(config: Config) -> Dict[str, str]:
    """Every settings file as text: sorted keys and fixed formatting, so equal settings give equal bytes and DVC
    sees no change in a stage whose settings did not change."""
    files = {**{stage: stage_settings(config, stage) for stage in STAGE_SETTINGS},
             RUN_SETTINGS_FILE: run_settings(config)}
    return {name: json.dumps(values, indent=2, sort_keys=True) + "\n" for name, values in files.items()}


def load_stage_config(stage: str, overrides: Sequence[str] = (), folder: Path = SETTINGS_DIR) -> Config:
    """The stage's `Config` from `settings/<stage>.json` and `settings/run.json`, plus `key=value` overrides for a
    debugging run (only of keys the stage reads); sections it does not read are `UnreadSection`s."""
    selected = _read(folder, stage)
    if sorted(selected) != sorted(STAGE_SETTINGS[stage]):
        raise ConfigError(f"{folder / stage}.json holds other settings ({', '.join(sorted(selected))}) than stage "
                          f"'{stage}' reads ({', '.join(STAGE_SETTINGS[stage])}): it was written by another version "
                          f"of the code. Run `dvc repro` (or `python stages/validate.py`) to rewrite it.")
    raw = config_to_dict(Config())
    for key, value in {**selected, **_read(folder, RUN_SETTINGS_FILE)}.items():
        _set(raw, key, value)
    for override in overrides:
        key, value = _parse_override(override, stage)
        _set(raw, key, value)
    config = config_from_mapping(raw)
    check_names(config, [key for key in NAMED_SETTINGS if _reads(stage, key)])
    return _without_unread(config, stage)


def _read(folder: Path, name: str) -> Dict[str, Any]:
    path = folder / f"{name}.json"
    try:
        values = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: the validate stage writes it from params.yaml. Run `dvc repro` "
                          f"(or `python stages/validate.py`) first.") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}). Run `dvc repro` (or `python stages/validate.py`) "
                          f"to rewrite it.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} is not a mapping of settings. Run `dvc repro` (or `python stages/validate.py`) "
                          f"to rewrite it.")
    return values


def _parse_override(override: str, stage: str) -> tuple[str, Any]:
    """`key=value` with a YAML value, for a key the stage reads."""
    key, separator, text = override.partition("=")
    key = key.strip()
    if not separator or not key:
        raise ConfigError(f"Could not read the override '{override}': overrides look like `prune.ratio=0.7`.")
    if not (_reads(stage, key) or key in RUN_ONLY_SETTINGS):
        raise ConfigError(f"Stage '{stage}' does not read '{key}' (it reads {', '.join(STAGE_SETTINGS[stage])}), "
                          f"so an override of it changes nothing. Set it in params.yaml and run `dvc repro`.")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"The value of the override '{override}' is not valid YAML ({error}).") from None


def _reads(stage: str, key: str) -> bool:
    """Whether `key` is, or lies inside, a setting the stage reads."""
    return any(key == read or key.startswith(f"{read}.") for read in STAGE_SETTINGS[stage])


def _without_unread(config: Config, stage: str) -> Config:
    sections: Dict[str, Any] = {}
    for field in dataclasses.fields(Config):
        name = field.name
        if name in STAGE_SETTINGS[stage]:
            continue
        keys = [key.split(".", 1)[1] for key in STAGE_SETTINGS[stage] if key.startswith(f"{name}.")]
        sections[name] = UnreadSection(stage, name, {key: getattr(getattr(config, name), key) for key in keys})
    return dataclasses.replace(config, **sections)


def _get(tree: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _set(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key; a parent that does not exist is created, for the schema check to name it."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"Could not apply '{dotted}': '{part}' is a value, not a section of settings.")
    tree[leaf] = value


def _without_run_only(value: Any, key: str) -> Any:
    if not isinstance(value, dict):
        return value
    return {name: _without_run_only(item, f"{key}.{name}") for name, item in value.items()
            if f"{key}.{name}" not in RUN_ONLY_SETTINGS}
