"""A study's grid: the study file (base settings, shared overrides, the axes) read and checked, and the cells it
defines, each with its fully validated settings, before anything trains."""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping

import yaml

from pipeline.config import Config, read_settings
from pipeline.errors import ConfigError
from pipeline.settings import settings_from_mapping


@dataclass
class StudySpec:
    """A study file: which settings every cell starts from, and the axes of the grid."""

    name: str
    description: str = ""
    base: str = "params.yaml"
    settings: Dict[str, Any] = field(default_factory=dict)
    methods: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    ratios: List[float] = field(default_factory=list)
    retrain: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])


@dataclass(frozen=True)
class Cell:
    """One point of the grid and its complete, validated settings."""

    method: str
    ratio: float
    schedule: str
    seed: int
    config: Config

    @property
    def label(self) -> str:
        return f"{self.method} · ratio {self.ratio:g} · {self.schedule} · seed {self.seed}"


def load_study(path: Path) -> StudySpec:
    """Read and check a study file; every mistake is a ConfigError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"The study file {path} does not exist. The shipped studies are in studies/ "
                          f"(e.g. studies/table1.yaml).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML ({' '.join(str(error).split())}). Fix its syntax.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with the keys name, base, settings, methods, ratios, retrain "
                          f"and seeds (see studies/table1.yaml).")
    known = [f.name for f in dataclasses.fields(StudySpec)]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{path}: unknown key '{key}'.{hint} A study file has the keys {', '.join(known)}.")
    spec = StudySpec(**{"name": path.stem, **raw})
    _check_spec(spec, path)
    return spec


def _check_spec(spec: StudySpec, path: Path) -> None:
    """Types and non-empty axes; the values themselves are checked per cell against the settings schema."""
    def require(condition: bool, key: str, problem: str) -> None:
        if not condition:
            raise ConfigError(f"{path}: '{key}' {problem}. Fix it in the study file.")

    require(isinstance(spec.name, str) and spec.name.replace("-", "").replace("_", "").isalnum(), "name",
            f"{spec.name!r} must be a plain name (letters, digits, '-' and '_'): it names the output folder")
    require(isinstance(spec.base, str), "base", "must be the path of a settings file such as params.yaml")
    require(isinstance(spec.settings, dict), "settings", "must map dotted keys to values, e.g. {model.name: resnet20}")
    for axis in ("methods", "retrain"):
        groups = getattr(spec, axis)
        require(isinstance(groups, dict) and len(groups) > 0 and all(isinstance(v, dict) for v in groups.values()),
                axis, "must map row names to overrides, e.g. {TPP: {prune.method: tpp}}, with at least one entry")
    require(isinstance(spec.ratios, list) and len(spec.ratios) > 0
            and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in spec.ratios), "ratios",
            "must be a non-empty list of pruning ratios such as [0.5, 0.7, 0.9]")
    require(isinstance(spec.seeds, list) and len(spec.seeds) > 0
            and all(isinstance(s, int) and not isinstance(s, bool) for s in spec.seeds), "seeds",
            "must be a non-empty list of integer seeds such as [0, 1, 2]")
    for axis in ("ratios", "seeds"):
        values = getattr(spec, axis)
        require(len(set(values)) == len(values), axis, f"{values} lists a value twice")


def plan(spec: StudySpec, study_path: Path, root: Path) -> List[Cell]:
    """Every cell of the grid with its settings checked, so a bad value stops the study before any training.

    Seeds vary slowest and schedules fastest, so consecutive cells share their dense and pruned networks.
    """
    base_path = root / spec.base
    if not base_path.is_file():
        raise ConfigError(f"{study_path}: 'base' names {spec.base}, which does not exist in {root}. It is the "
                          f"settings file every cell starts from, relative to the repository root (params.yaml "
                          f"or a recipe).")
    base = read_settings(base_path)
    cells = []
    for seed in spec.seeds:
        for method, method_overrides in spec.methods.items():
            for ratio in spec.ratios:
                for schedule, schedule_overrides in spec.retrain.items():
                    raw = copy.deepcopy(base)
                    for overrides in (spec.settings, method_overrides, {"prune.ratio": ratio}, schedule_overrides,
                                      {"seed": seed}):
                        _apply(raw, overrides, study_path, base_path)
                    cells.append(_cell(method, ratio, schedule, seed, raw, study_path))
    return cells


def _apply(raw: Dict[str, Any], overrides: Mapping[str, Any], study_path: Path, base_path: Path) -> None:
    """Set dotted keys (`retrain.lr: 0.001`) in the nested settings; a key the base file lacks is refused."""
    for dotted, value in overrides.items():
        *sections, leaf = str(dotted).split(".")
        node = raw
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            raise ConfigError(f"{study_path}: the override '{dotted}' names no setting of {base_path.name}. "
                              f"Overrides use the dotted keys of params.yaml, such as 'prune.method' or "
                              f"'retrain.lr'.")
        node[leaf] = copy.deepcopy(value)


def _cell(method: str, ratio: float, schedule: str, seed: int, raw: Dict[str, Any], study_path: Path) -> Cell:
    try:
        config = settings_from_mapping(raw)
    except ConfigError as error:
        raise ConfigError(f"{study_path}, cell '{method}' at ratio {ratio:g}, '{schedule}', seed {seed}: "
                          f"{error}") from None
    return Cell(method, float(ratio), schedule, seed, config)
