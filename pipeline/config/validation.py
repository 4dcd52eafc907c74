"""Range and format checks that types alone cannot express, each failing with one paragraph naming the key, the
rule and the fix."""

from __future__ import annotations

import difflib
import math
import re
from typing import Sequence

from pipeline.config.schema import LATENCY_TARGETS, Config, DataConfig, PruneConfig, TrainConfig, TrainerConfig
from pipeline.errors import ConfigError

AMP_MODES = ("auto", "fp32", "bf16", "fp16")
STEP_MODES = ("eager", "compile", "graph")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
DATA_LOADERS = ("auto", "workers", "device")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


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
    require((config.model.name is None) != (config.model.factory is None), "model.factory",
            "and model.name are both set or both null: give exactly one (model.name: a registry, torchvision/ or "
            "timm/ name; model.factory: the dotted path of your own function, with model.name: null)")
    require("pretrained" not in config.model.options, "model.options.pretrained",
            "is no longer a model option; write `model.pretrained: true` (a key of its own) instead")
    _positive("evaluate.latency_batch_size", config.evaluate.latency_batch_size)
    _positive("evaluate.latency_repeats", config.evaluate.latency_repeats)
    targets = list(config.evaluate.targets)
    unknown = [target for target in targets if target not in LATENCY_TARGETS]
    require(not unknown, "evaluate.targets", f"{unknown} are not latency targets; choose from "
            f"{', '.join(LATENCY_TARGETS)} (graph and compile are timed only where the evaluation runs on CUDA)")
    require(bool(targets) and len(set(targets)) == len(targets), "evaluate.targets",
            f"{targets} must name at least one target, each once")


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
