"""The settings schema: one dataclass per section of params.yaml, with its types.

The dataclass defaults are the project's default experiment, the one source of it: the shipped params.yaml writes
every one of them out (DVC tracks what is written), and tests/test_config.py fails when the two differ. A library
user building `PruneConfig()` therefore gets what a pipeline user gets from the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union


@dataclass
class DataConfig:
    """Which dataset, where it lives, and how it is fed."""

    name: str = "digits"
    root: str = "data"
    eval_batch_size: int = 512
    num_workers: Union[int, str] = "auto"
    loader: str = "auto"
    image_size: Optional[int] = None
    channels: Optional[int] = None
    augment: bool = True
    download: bool = False


@dataclass
class ModelConfig:
    """The architecture (a registry name, `torchvision/<name>`, `timm/<name>`, or `factory`: the dotted path of
    your own callable) and its constructor options; the starting point of the dense network: random (default),
    the published weights (`pretrained`) or a file of weights (`checkpoint`)."""

    name: Optional[str] = "resnet56"
    factory: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=lambda: {"shortcut": "A"})
    pretrained: bool = False
    checkpoint: Optional[str] = None


@dataclass
class TrainConfig:
    """SGD with a step learning-rate schedule by epoch: pretraining and retraining."""

    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: List[int] = field(default_factory=lambda: [6, 9])
    gamma: float = 0.1


@dataclass
class RegularizerConfig:
    """TPP's penalties and the λ schedule λ_t = min(max_lambda, delta * floor(t / interval))."""

    alpha: float = 1000.0
    delta: float = 0.01
    interval: int = 1
    max_lambda: float = 1.0
    stabilize_steps: int = 300
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
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reg: RegularizerConfig = field(default_factory=RegularizerConfig)


@dataclass
class TrainabilityConfig:
    """TPP's trainability measure, the mean Jacobian singular value (JSV) of the output w.r.t. the input, taken on
    the first `jsv_samples` test images (0 turns it off: it costs classes × input-size per image)."""

    jsv_samples: int = 32


# Deployment targets the evaluate stage can time (graph and compile only where it runs on CUDA).
LATENCY_TARGETS = ("eager", "onnxruntime", "graph", "compile")


@dataclass
class EvaluateConfig:
    """How the final comparison is measured."""

    latency_batch_size: int = 256
    latency_repeats: int = 20
    targets: List[str] = field(default_factory=lambda: list(LATENCY_TARGETS))


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
    pretrain: TrainConfig = field(default_factory=lambda: TrainConfig(lr=0.02))
    prune: PruneConfig = field(default_factory=PruneConfig)
    retrain: TrainConfig = field(default_factory=TrainConfig)
    trainability: TrainabilityConfig = field(default_factory=TrainabilityConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def layer_ratios(self) -> Dict[str, float]:
        """The pattern → ratio mapping used for selection: `layers` at `ratio`, then `ratios` (last match wins)."""
        return {**{pattern: self.prune.ratio for pattern in self.prune.layers}, **self.prune.ratios}
