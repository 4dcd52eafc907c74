"""The settings schema and its loading from params.yaml.

params.yaml is the single hand-edited source of experiment settings. It is composed with hydra-core's Compose
API (so stage scripts accept Hydra-style overrides such as `prune.ratio=0.7` for debugging) and checked against
the dataclasses below before any work starts: an unknown key, a wrong type or a value out of range raises a
`ConfigError` naming the key's full name and the fix. Settings are never rewritten silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError

AMP_MODES = ("auto", "fp32", "bf16", "fp16")
STEP_MODES = ("eager", "compile", "graph")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
DATA_LOADERS = ("auto", "workers", "device")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how it is fed."""

    name: str = "digits"
    root: str = "data"
    eval_batch_size: int = 256
    num_workers: Union[int, str] = 0
    loader: str = "auto"
    image_size: Optional[int] = None
    channels: Optional[int] = None
    augment: bool = True
    download: bool = False


@dataclass
class ModelConfig:
    """The architecture, by registry name, and its constructor options; the starting point of the dense network:
    random (default), torchvision's published weights (`pretrained`) or a file of weights (`checkpoint`)."""

    name: str = "resnet20"
    options: Dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False
    checkpoint: Optional[str] = None


@dataclass
class TrainConfig:
    """SGD with a step learning-rate schedule by epoch: pretraining and retraining."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: List[int] = field(default_factory=lambda: [15, 25])
    gamma: float = 0.1


@dataclass
class RegularizerConfig:
    """TPP's penalties and the λ schedule λ_t = min(max_lambda, delta * floor(t / interval))."""

    alpha: float = 1000.0
    delta: float = 1e-4
    interval: int = 10
    max_lambda: float = 1.0
    stabilize_steps: int = 10000
    decorrelation: bool = True
    bn_penalty: bool = True
    zero_out: bool = False
    zero_out_interval: int = 100


@dataclass
class PruneConfig:
    """Which filters to prune, how, and the regularized training that precedes removal."""

    method: str = "tpp"
    layers: List[str] = field(default_factory=lambda: ["*layer*.conv1"])
    ratio: float = 0.9
    ratios: Dict[str, float] = field(default_factory=dict)
    skip: List[str] = field(default_factory=list)
    round_to: int = 1
    batch_size: int = 128
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reg: RegularizerConfig = field(default_factory=RegularizerConfig)


@dataclass
class TrainabilityConfig:
    """TPP's trainability measure, the mean Jacobian singular value (JSV) of the output w.r.t. the input, taken on
    the first `jsv_samples` test images (0 turns it off: it costs classes × input-size per image)."""

    jsv_samples: int = 32


@dataclass
class EvaluateConfig:
    """How the final comparison is measured."""

    latency_batch_size: int = 64
    latency_repeats: int = 20


@dataclass
class TrainerConfig:
    """How the one training loop runs, whatever it trains: processes, the compiled step, numerics and resume."""

    devices: int = 1
    nodes: int = 1
    sync_bn: Union[bool, str] = "auto"
    step: str = "eager"
    memory_format: str = "auto"
    tf32: bool = False
    deterministic: bool = False
    checkpoint_every: int = 200
    resume: bool = True


@dataclass
class Config:
    """All settings of one experiment: one section per stage plus the shared ones."""

    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    retrain: TrainConfig = field(default_factory=TrainConfig)
    trainability: TrainabilityConfig = field(default_factory=TrainabilityConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def layer_ratios(self) -> Dict[str, float]:
        """The pattern → ratio mapping used for selection: `layers` at `ratio`, then `ratios` (last match wins)."""
        return {**{pattern: self.prune.ratio for pattern in self.prune.layers}, **self.prune.ratios}


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
    _check_keys(raw, Config, prefix="")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        config: Config = OmegaConf.to_object(merged)
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


def _check_keys(raw: Dict[str, Any], schema: type, prefix: str) -> None:
    """Refuse keys the schema does not know (suggesting the closest known one) and keys left out: every setting is
    written in params.yaml, so DVC tracks it and nothing falls back to a default hidden in the code."""
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            section = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
            raise ConfigError(f"params.yaml: unknown key '{prefix}{key}'.{hint} Known keys in {section}: "
                              f"{', '.join(sorted(known))}. Rename or remove it.")
    missing = [name for name in known if name not in raw]
    if missing:
        raise ConfigError(f"params.yaml: missing key '{prefix}{missing[0]}'. Every setting must be written out so "
                          f"that DVC tracks it; add it (the shipped params.yaml and README.md list them all).")
    for key, value in raw.items():
        full_key = f"{prefix}{key}"
        field_type = _dataclass_type(known[key].type)
        wants_mapping = field_type is not None or str(known[key].type).startswith("Dict")
        if wants_mapping and value is not None and not isinstance(value, dict):
            raise ConfigError(f"params.yaml: '{full_key}' must be a mapping of keys (as in the shipped "
                              f"params.yaml), not {value!r}. Fix it in params.yaml.")
        if field_type is not None and isinstance(value, dict):
            _check_keys(value, field_type, prefix=f"{full_key}.")


def _dataclass_type(annotation: Any) -> Optional[type]:
    """The nested dataclass a field holds, if any (annotations are strings under `from __future__`)."""
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    candidate = globals().get(name)
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


def validate(config: Config) -> None:
    """Range and format checks that types alone cannot express; raise on the first problem.

    Names looked up in registries (datasets, models, methods) are checked one layer up, in `pipeline.settings`,
    so that this module depends on none of the modules that read its sections.
    """
    require(DEVICE_PATTERN.match(config.device) is not None, "device",
             f"'{config.device}' is not a device; use auto, cpu, cuda, cuda:N or mps")
    require(config.amp in AMP_MODES, "amp", f"'{config.amp}' is not one of {', '.join(AMP_MODES)}")
    _positive("data.eval_batch_size", config.data.eval_batch_size)
    _validate_data(config.data)
    for key in ("image_size", "channels"):
        value = getattr(config.data, key)
        require(value is None or value >= 1, f"data.{key}", "must be null (native) or a positive integer")
    for section in ("pretrain", "retrain"):
        _validate_training(section, getattr(config, section))
    _validate_prune(config.prune)
    _validate_trainer(config.trainer)
    require(config.trainability.jsv_samples >= 0, "trainability.jsv_samples", "must be 0 (off) or more")
    require(not (config.model.pretrained and config.model.checkpoint), "model.checkpoint",
            "is set while model.pretrained is true: the dense network starts from one set of weights. Keep "
            "model.pretrained: true (torchvision's published weights) or model.checkpoint: <path> (your own), "
            "not both")
    require(config.model.checkpoint != "", "model.checkpoint", "is an empty string; write null for no file")
    require("pretrained" not in config.model.options, "model.options.pretrained",
            "is no longer a model option; write `model.pretrained: true` (a key of its own) instead")
    _positive("evaluate.latency_batch_size", config.evaluate.latency_batch_size)
    _positive("evaluate.latency_repeats", config.evaluate.latency_repeats)


def _validate_data(data: DataConfig) -> None:
    workers = data.num_workers
    require(workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 0),
            "data.num_workers", f"{workers!r} is neither 'auto' (the machine's cores, at most 8) nor a count of 0 "
            f"or more (0 loads in the training process)")
    require(data.loader in DATA_LOADERS, "data.loader",
            f"'{data.loader}' is not one of {', '.join(DATA_LOADERS)} (auto: the dataset in GPU memory on CUDA for "
            f"mnist/cifar, worker processes otherwise)")
    require(not (data.loader == "device" and data.name == "imagefolder"), "data.loader",
            "is 'device' but data.name is 'imagefolder': an image-folder dataset is decoded from files and does "
            "not fit in device memory; use `data.loader: workers` (or auto)")


def _validate_training(section: str, train: TrainConfig) -> None:
    if section == "pretrain":
        require(train.epochs >= 0, "pretrain.epochs",
                "must be 0 (keep the starting weights of model.pretrained / model.checkpoint as they are) or more")
    else:
        _positive(f"{section}.epochs", train.epochs)
    _positive(f"{section}.batch_size", train.batch_size)
    _positive(f"{section}.lr", train.lr)
    require(0 <= train.momentum < 1, f"{section}.momentum", "must be in [0, 1)")
    require(train.weight_decay >= 0, f"{section}.weight_decay", "must be 0 or more")
    require(0 < train.gamma <= 1, f"{section}.gamma", "must be in (0, 1]")
    milestones = list(train.milestones)
    require(milestones == sorted(set(milestones)) and all(m >= 1 for m in milestones), f"{section}.milestones",
             f"{milestones} must be strictly increasing epoch numbers of at least 1")
    require(all(m < train.epochs for m in milestones), f"{section}.milestones",
             f"{milestones} has an epoch at or past {section}.epochs={train.epochs}, so it would never apply")


def _validate_trainer(trainer: TrainerConfig) -> None:
    _positive("trainer.devices", trainer.devices)
    _positive("trainer.nodes", trainer.nodes)
    require(isinstance(trainer.sync_bn, bool) or trainer.sync_bn == "auto", "trainer.sync_bn",
            f"{trainer.sync_bn!r} is not one of auto, true, false (auto and true: BatchNorm statistics over the "
            f"global batch when several processes train; false: each process normalises with its own shard's)")
    require(trainer.step in STEP_MODES, "trainer.step", f"'{trainer.step}' is not one of {', '.join(STEP_MODES)}")
    require(trainer.memory_format in MEMORY_FORMATS, "trainer.memory_format",
            f"'{trainer.memory_format}' is not one of {', '.join(MEMORY_FORMATS)}")
    require(trainer.checkpoint_every >= 0, "trainer.checkpoint_every",
            "must be 0 (resume checkpoints at epoch ends only) or a number of steps")


def _validate_prune(prune: PruneConfig) -> None:
    require(len(prune.layers) + len(prune.ratios) > 0, "prune.layers",
             "is empty and prune.ratios too: name at least one layer pattern such as '*layer*.conv1'")
    _ratio("prune.ratio", prune.ratio)
    _positive("prune.round_to", prune.round_to)
    for pattern, ratio in prune.ratios.items():
        _ratio(f"prune.ratios['{pattern}']", ratio)
    _positive("prune.batch_size", prune.batch_size)
    _positive("prune.lr", prune.lr)
    require(0 <= prune.momentum < 1, "prune.momentum", "must be in [0, 1)")
    require(prune.weight_decay >= 0, "prune.weight_decay", "must be 0 or more")
    reg = prune.reg
    require(reg.alpha >= 0, "prune.reg.alpha", "must be 0 or more")
    _positive("prune.reg.delta", reg.delta)
    _positive("prune.reg.interval", reg.interval)
    _positive("prune.reg.max_lambda", reg.max_lambda)
    require(reg.stabilize_steps >= 0, "prune.reg.stabilize_steps", "must be 0 or more")
    _positive("prune.reg.zero_out_interval", reg.zero_out_interval)


def _ratio(key: str, value: float) -> None:
    require(0 <= value < 1 and math.isfinite(value), key,
             f"{value} is not a pruning ratio; it must be in [0, 1) (a whole layer is never pruned)")


def _positive(key: str, value: float) -> None:
    require(value > 0 and math.isfinite(value), key, f"{value} must be greater than 0")


def one_of(key: str, value: str, allowed: Sequence[str]) -> None:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    require(value in allowed, key, f"'{value}' is unknown.{hint} Available: {', '.join(allowed)}")


def require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(f"params.yaml: '{key}' {problem}. Fix it in params.yaml (or in the override you passed).")
