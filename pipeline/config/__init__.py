"""The settings schema and its loading from params.yaml: `schema` (the dataclasses and their defaults), `load`
(Hydra composition, YAML and key errors), `validation` (ranges and formats).

params.yaml is the single hand-edited source of experiment settings. It is composed with hydra-core's Compose
API (so stage scripts accept Hydra-style overrides such as `prune.ratio=0.7` for debugging) and checked against
the dataclasses of `schema` before any work starts: an unknown key, a wrong type or a value out of range raises a
`ConfigError` naming the key's full name and the fix. Settings are never rewritten silently.
The schema's defaults are the shipped params.yaml's values (one source; see `schema`).
"""

from pipeline.config.load import config_from_mapping, config_to_dict, load_config, project_root, read_settings
from pipeline.config.schema import (LATENCY_TARGETS, Config, DataConfig, EvaluateConfig, ModelConfig, PruneConfig, RegularizerConfig,
                                    TrainabilityConfig, TrainConfig, TrainerConfig)
from pipeline.config.validation import one_of, require, validate

__all__ = ["LATENCY_TARGETS", "Config", "DataConfig", "EvaluateConfig", "ModelConfig", "PruneConfig", "RegularizerConfig",
           "TrainabilityConfig", "TrainConfig", "TrainerConfig", "config_from_mapping", "config_to_dict",
           "load_config", "one_of", "project_root", "read_settings", "require", "validate"]
