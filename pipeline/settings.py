"""Settings as the stages use them: params.yaml loaded and checked by `config`, plus the names that only the
registries know (datasets, models, pruning methods).

This module sits above `config`, `data`, `models` and `pruning`, so that `config` imports none of them and
imports point one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

from pipeline.config import Config, config_from_mapping, load_config, one_of
from pipeline.data import available_datasets
from pipeline.methods import available_methods
from pipeline.models import check_model_name


def _check_model_name(key: str, name: Optional[str]) -> None:
    """A registry, torchvision/ or timm/ name (null when model.factory names the user's own callable)."""
    if name is not None:
        check_model_name(name)


def _one_of(names: Callable[[], Sequence[str]]) -> Callable[[str, Any], None]:
    return lambda key, value: one_of(key, value, names())


# Settings whose value is a name one registry knows, each with the check of that name.
NAMED_SETTINGS: Dict[str, Callable[[str, Any], None]] = {
    "data.name": _one_of(available_datasets), "model.name": _check_model_name,
    "prune.method": _one_of(available_methods)}


def load_settings(overrides: Sequence[str] = (), path: Optional[Path] = None) -> Config:
    """params.yaml (plus Hydra-style overrides) as a `Config` whose every key, value and name is valid."""
    return check_names(load_config(overrides, path=path))


def settings_from_mapping(raw: Dict[str, Any]) -> Config:
    """A nested dict of settings as a fully checked `Config`."""
    return check_names(config_from_mapping(raw))


def check_names(config: Config, keys: Sequence[str] = tuple(NAMED_SETTINGS)) -> Config:
    """Refuse a dataset, model or method that no registry knows, suggesting the closest known name."""
    for key in keys:
        section, name = key.split(".")
        NAMED_SETTINGS[key](key, getattr(getattr(config, section), name))
    return config
