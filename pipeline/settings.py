"""Settings as the stages use them: params.yaml loaded and checked by `config`, plus the names that only the
registries know (datasets, models, pruning methods).

This module sits above `config`, `data`, `models` and `pruning`, so that `config` imports none of them and
imports point one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from pipeline.config import Config, config_from_mapping, load_config, one_of
from pipeline.data import available_datasets
from pipeline.models import check_model_name
from pipeline.pruning.methods import available_methods


def load_settings(overrides: Sequence[str] = (), path: Optional[Path] = None) -> Config:
    """params.yaml (plus Hydra-style overrides) as a `Config` whose every key, value and name is valid."""
    return check_names(load_config(overrides, path=path))


def settings_from_mapping(raw: Dict[str, Any]) -> Config:
    """A nested dict of settings as a fully checked `Config`."""
    return check_names(config_from_mapping(raw))


def check_names(config: Config) -> Config:
    """Refuse a dataset, model or method that no registry knows, suggesting the closest known name."""
    one_of("data.name", config.data.name, available_datasets())
    if config.model.name is not None:
        check_model_name(config.model.name)
    one_of("prune.method", config.prune.method, available_methods())
    return config
