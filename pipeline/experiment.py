"""The pipeline's phases as plain functions: train the dense network, prune it, retrain it, measure it.

The stage scripts call each phase once and write the DVC outputs; the study runner calls them for every cell of a
grid in one process. Each phase reseeds from its settings right before it trains, so what it produces depends only
on its inputs and settings, never on what ran earlier in the same process: a study cell reproduces the DVC
pipeline run with the same params.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from pipeline.checkpoint import Architecture, dense_model
from pipeline.config import Config
from pipeline.measure.jacobian import JacobianProbe, first_inputs, mean_jacobian_singular_value
from pipeline.methods import PruneContext, PruneOutcome, run_method
from pipeline.runtime import Runtime, seed_everything
from pipeline.pruning.selection import select_filters
from pipeline.hooks import TrainingHooks
from pipeline.training.loop import Batches, EpochRecord, fit, milestone_schedule, sgd
from pipeline.training.state import ResumeFile

OnEpoch = Optional[Callable[[EpochRecord], None]]


def pretrain(config: Config, architecture: Architecture, train: Batches, test: Batches, runtime: Runtime,
             on_epoch: OnEpoch = None, resume: Optional[ResumeFile] = None) -> tuple[nn.Module, List[EpochRecord]]:
    """Build the dense network (from the seed, torchvision's weights or a user's file) and train it with SGD and
    the milestone LR schedule of `pretrain`; with `pretrain.epochs: 0` the starting weights are imported as they are."""
    settings = config.pretrain
    seed_everything(config.seed)
    model = dense_model(config.model, architecture).to(runtime.device)
    if settings.epochs == 0:
        return model, []
    optimizer = sgd(model, settings.lr, settings.momentum, settings.weight_decay)
    history = fit(model, train, test, optimizer, runtime=runtime, epochs=settings.epochs,
                  scheduler=milestone_schedule(optimizer, settings.milestones, settings.gamma), stage="pretrain",
                  resume=resume, on_epoch=on_epoch)
    return model, history


def select(config: Config, dense: nn.Module, example_inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """The filters every method removes: chosen once from the dense weights by the paper's rule."""
    return select_filters(dense, config.layer_ratios(), config.prune.skip, example_inputs=example_inputs,
                          round_to=config.prune.round_to)


def prune(config: Config, dense: nn.Module, selection: Mapping[str, torch.Tensor], example_inputs: torch.Tensor,
          train: Batches, test: Batches, runtime: Runtime, on_epoch: OnEpoch = None,
          resume: Optional[ResumeFile] = None) -> PruneOutcome:
    """Run `prune.method` on the dense network (modified in place) and return the physically smaller one."""
    seed_everything(config.seed)
    context = PruneContext(dense, selection, example_inputs, train, test, runtime, config.prune,
                           on_epoch=on_epoch, seed=config.seed, resume=resume)
    return run_method(config.prune.method, context)


def retrain(config: Config, model: nn.Module, train: Batches, test: Batches, runtime: Runtime,
            on_epoch: OnEpoch = None, resume: Optional[ResumeFile] = None) -> List[EpochRecord]:
    """Fine-tune the pruned network with a fresh optimizer, measuring its trainability after every epoch."""
    settings = config.retrain
    probe_inputs = trainability_inputs(config, test, runtime.device)
    hooks = JacobianProbe(probe_inputs) if probe_inputs is not None else TrainingHooks()
    seed_everything(config.seed)
    optimizer = sgd(model, settings.lr, settings.momentum, settings.weight_decay)
    return fit(model, train, test, optimizer, runtime=runtime, epochs=settings.epochs,
               scheduler=milestone_schedule(optimizer, settings.milestones, settings.gamma), hooks=hooks,
               stage="retrain", resume=resume, on_epoch=on_epoch)


def trainability_inputs(config: Config, test: Batches, device: torch.device) -> Optional[torch.Tensor]:
    """The fixed test images the mean JSV is taken on, or None when `trainability.jsv_samples` is 0."""
    samples = config.trainability.jsv_samples
    return first_inputs(test, samples, device) if samples > 0 else None


def trainability(model: nn.Module, inputs: Optional[torch.Tensor]) -> Optional[float]:
    """The model's mean JSV on the probe inputs, or None when the measurement is off."""
    return None if inputs is None else mean_jacobian_singular_value(model, inputs)
