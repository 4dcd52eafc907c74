"""params.yaml (or any settings file) read into a checked `Config`: composed with hydra-core's Compose API, so
Hydra-style overrides such as `prune.ratio=0.7` apply; YAML and Hydra errors mapped to one paragraph naming the
line or the key; keys and types checked by OmegaConf's struct mode against the schema, with the closest known key
added to its unknown-key error; then the range checks of `validation`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

import pipeline.config.schema as schema_module
from pipeline.config.schema import Config
from pipeline.config.validation import validate
from pipeline.errors import ConfigError


def project_root() -> Path:
    """The repository root: DVC_ROOT when DVC runs the stage, else the nearest folder with a dvc.yaml."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").exists():
            return folder
    return here


def load_config(overrides: Sequence[str] = (), path: Optional[Path] = None) -> Config:
    """Read params.yaml (plus Hydra-style overrides) into a validated `Config`."""
    path = Path(path) if path is not None else project_root() / "params.yaml"
    return config_from_mapping(read_settings(path, overrides))


def read_settings(path: Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The settings file as a plain nested dict, with Hydra-style overrides applied, not yet checked."""
    if not Path(path).is_file():
        raise ConfigError(f"The settings file {path} does not exist. Run the stage from the repository root "
                          f"(where params.yaml lives) or pass the file's path.")
    return _compose(Path(path), overrides)


def config_from_mapping(raw: Dict[str, Any]) -> Config:
    """Check a nested dict of settings (keys, types, ranges) and turn it into a `Config`."""
    missing = _missing_keys(raw, Config, prefix="")
    try:
        merged = OmegaConf.merge(_merge_base(), raw)
        if missing:
            raise ConfigError(f"params.yaml: missing key '{missing[0]}'. Every setting must be written out so that "
                              f"DVC tracks it; add it (the shipped params.yaml and README.md list them all).")
        config: Config = OmegaConf.to_object(merged)
    except ConfigKeyError as error:
        raise _unknown_key(error) from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        raise ConfigError(f"params.yaml: the value of '{key}' has the wrong type ({_first_line(error)}). "
                          f"Expected {_expected_type(key)}; fix it in params.yaml.") from None
    validate(config)
    return config


def config_to_dict(config: Config) -> Dict[str, Any]:
    """Plain nested dict of the settings, for checkpoints and experiment tracking."""
    return dataclasses.asdict(config)


def _compose(path: Path, overrides: Sequence[str]) -> Dict[str, Any]:
    """Compose the YAML with Hydra so command-line overrides use Hydra's grammar."""
    _check_top_level_is_a_mapping(path)
    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base=None, job_name="tpp"):
            composed = compose(config_name=path.stem, overrides=list(overrides))
        container = OmegaConf.to_container(composed, resolve=True) if isinstance(composed, DictConfig) else None
    except HydraException as error:
        raise ConfigError(f"Could not apply the settings {list(overrides)} to {path.name}: "
                          f"{_first_line(error).rstrip('.')}. Overrides look like `prune.ratio=0.7`; "
                          f"keys must exist in params.yaml.") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path.name} could not be read: {_first_line(error)}. Check its YAML syntax "
                          f"and any ${{...}} interpolation.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
        opened = f" ({context} that starts at line {start.line + 1})" if context and start else ""
        problem = getattr(error, "problem", None) or error
        raise ConfigError(f"{path.name} is not valid YAML{where}: {problem}{opened}. "
                          f"Check its syntax (indent with spaces, close brackets and quotes).") from None
    if not isinstance(container, dict):
        raise ConfigError(f"{path.name} must be a mapping of sections (seed, data, model, ...); it is not.")
    return container


def _check_top_level_is_a_mapping(path: Path) -> None:
    """A file whose top level is a list or a scalar would reach Hydra and fail there with its own jargon."""
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return
    if document is not None and not isinstance(document, dict):
        raise ConfigError(f"{path.name} must be a mapping of sections (seed, data, model, ...) but its top level is "
                          f"a {type(document).__name__}. Restore the shipped layout: one `section:` per line at the "
                          f"left margin, its keys indented below it.")


def _missing_keys(raw: Dict[str, Any], schema: type, prefix: str) -> List[str]:
    """Keys left out (every setting is written in params.yaml, so DVC tracks it and nothing falls back to a default
    hidden in the code); a section given a value instead of a mapping is refused here, where its name is known."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    missing = [f"{prefix}{name}" for name in known if name not in raw]
    for key, value in raw.items():
        if key not in known:
            continue  # OmegaConf's merge names it
        full_key = f"{prefix}{key}"
        field_type = _dataclass_type(known[key].type)
        wants_mapping = field_type is not None or str(known[key].type).startswith("Dict")
        if wants_mapping and value is not None and not isinstance(value, dict):
            raise ConfigError(f"params.yaml: '{full_key}' must be a mapping of keys (as in the shipped "
                              f"params.yaml), not {value!r}. Fix it in params.yaml.")
        if field_type is not None and isinstance(value, dict):
            missing += _missing_keys(value, field_type, prefix=f"{full_key}.")
    return missing


def _merge_base() -> DictConfig:
    """The schema as OmegaConf's merge base, its free-form mappings (model.options, prune.ratios) emptied: a mapping
    written in the file replaces the default one instead of being merged into it."""
    base = OmegaConf.structured(Config)
    for key in _mapping_fields(Config, prefix=""):
        OmegaConf.update(base, key, {}, merge=False)
    return base


def _mapping_fields(schema: type, prefix: str) -> Iterator[str]:
    for field in dataclasses.fields(schema):
        nested = _dataclass_type(field.type)
        if nested is not None:
            yield from _mapping_fields(nested, f"{prefix}{field.name}.")
        elif str(field.type).startswith("Dict"):
            yield f"{prefix}{field.name}"


def _unknown_key(error: ConfigKeyError) -> ConfigError:
    """OmegaConf's struct-mode error for a key the schema lacks, with the closest known key and the section's keys."""
    known = [f.name for f in dataclasses.fields(error.object_type)] if dataclasses.is_dataclass(error.object_type) \
        else []
    full_key = str(error.full_key or error.key)
    prefix = full_key[:-len(str(error.key))]
    close = difflib.get_close_matches(str(error.key), known, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    section = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
    return ConfigError(f"params.yaml: unknown key '{full_key}'.{hint} Known keys in {section}: "
                       f"{', '.join(sorted(known))}. Rename or remove it.")


def _dataclass_type(annotation: Any) -> Optional[type]:
    """The nested dataclass a field holds, if any (annotations are strings under `from __future__`)."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    candidate = getattr(schema_module, name, None)
    return candidate if dataclasses.is_dataclass(candidate) else None


def _expected_type(full_key: str) -> str:
    """Human name of the schema type at a dotted key."""
    schema: Any = Config
    annotation: Any = "a value"
    for part in full_key.split("."):
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields:
            break
        annotation = fields[part].type
        schema = _dataclass_type(annotation)
    return f"{annotation}" if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
