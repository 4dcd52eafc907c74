"""The step modes of pipeline.training.step: eager is the loop's own step, compile and graph equal it."""

from __future__ import annotations

import math
from typing import List, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import RegularizerConfig
from pipeline.errors import ConfigError
from pipeline.models import create_model
from pipeline.pruning.regularizer import TPPRegularizer
from pipeline.pruning.selection import select_filters
from pipeline.runtime import Runtime
from pipeline.training.loop import TrainingHooks, fit, sgd
from pipeline.training.step import train_step
from pipeline.training.step import build_step

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
Batch = Tuple[torch.Tensor, torch.Tensor]


def tiny_resnet(device: torch.device = CPU) -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", 4, in_channels=1, image_size=8).to(device)


def batches(sizes: List[int], device: torch.device = CPU, image: int = 8, channels: int = 1) -> List[Batch]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(size, channels, image, image, generator=generator).to(device),
             torch.randint(0, 4, (size,), generator=generator).to(device)) for size in sizes]


def tpp_hooks(model: nn.Module, example: torch.Tensor) -> TPPRegularizer:
    """TPP on every block's inner conv with λ growing each step, so the schedule's state matters."""
    pruned = select_filters(model, {"*layer*.conv1": 0.5}, example_inputs=example)
    config = RegularizerConfig(alpha=10.0, delta=0.1, interval=1, max_lambda=1.0, stabilize_steps=10)
    return TPPRegularizer(model, pruned, example, config)


def train(mode: str, data: List[Batch], *, device: torch.device = CPU, amp: str = "fp32",
          channels_last: bool = False, lr_change_at: int = -1) -> Tuple[nn.Module, List[torch.Tensor]]:
    """Train a fresh tiny ResNet with TPP through `build_step` in `mode`; the per-step totals it returned."""
    model = tiny_resnet(device).train()
    hooks = tpp_hooks(model, data[0][0][:1])
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    runtime = Runtime(device, amp=amp, step=mode, channels_last=channels_last)
    step = build_step(model, optimizer, torch.amp.GradScaler(device.type, enabled=False), hooks, runtime)
    totals = []
    for index, (inputs, targets) in enumerate(data):
        if index == lr_change_at:
            optimizer.param_groups[0]["lr"] *= 0.1
        totals.append(step(inputs, targets).clone())
    assert hooks.step == len(data)
    return model, totals


def assert_close_models(got: nn.Module, want: nn.Module, atol: float) -> None:
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.allclose(a.float(), b.float(), atol=atol, rtol=0), (name, (a.float() - b.float()).abs().max())


def test_eager_step_is_the_loops_train_step_bit_for_bit():
    data = batches([16, 16, 16])
    stepped, totals = train("eager", data)
    model = tiny_resnet().train()
    hooks = tpp_hooks(model, data[0][0][:1])
    optimizer = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    expected = [train_step(model, inputs, targets, optimizer, scaler, hooks, CPU, "fp32") for inputs, targets in data]
    assert all(torch.equal(a, b) for a, b in zip(totals, expected))
    assert all(torch.equal(a, b) for a, b in zip(stepped.state_dict().values(), model.state_dict().values()))


def test_two_eager_cpu_runs_with_tpp_are_byte_identical():
    data = batches([16, 16, 16])
    first, first_totals = train("eager", data)
    second, second_totals = train("eager", data)
    assert all(torch.equal(a, b) for a, b in zip(first_totals, second_totals))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_channels_last_step_equals_the_contiguous_one():
    data = batches([16, 16])
    contiguous, _ = train("eager", data)
    channels_last, _ = train("eager", data, channels_last=True)
    assert_close_models(channels_last, contiguous, atol=1e-5)


@pytest.mark.slow
def test_compiled_step_equals_eager_including_a_partial_batch_and_an_lr_change():
    """Three full batches (compiled), an LR change (recompiled once) and a partial last batch (run eagerly).

    Slow: Inductor's C++ code generation for the step takes minutes on a 2-core machine (about 4 min here).
    """
    data = batches([16, 16, 16, 16, 5])
    eager, eager_totals = train("eager", data, lr_change_at=3)
    compiled, compiled_totals = train("compile", data, lr_change_at=3)
    assert_close_models(compiled, eager, atol=1e-5)
    for got, want in zip(compiled_totals, eager_totals):
        assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("runtime, key", [
    (Runtime(CPU, amp="fp16", step="graph"), "amp: fp16"),
    (Runtime(CPU, step="graph", world_size=2), "trainer.devices"),
])
def test_graph_mode_refuses_what_a_captured_graph_cannot_replay(runtime, key):
    model = tiny_resnet()
    with pytest.raises(ConfigError, match=key):
        build_step(model, sgd(model, 0.1, 0.9, 0.0), torch.amp.GradScaler("cpu", enabled=False), TrainingHooks(),
                   runtime)


@needs_cuda
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_graphed_step_equals_eager_on_cuda(amp, exact_cuda_float32):
    """Warm-up, capture, replays, a re-capture after an LR change and an eager partial batch."""
    cuda = torch.device("cuda")
    data = batches([32] * 8 + [7], device=cuda)
    eager, eager_totals = train("eager", data, device=cuda, amp=amp, channels_last=True, lr_change_at=6)
    graphed, graphed_totals = train("graph", data, device=cuda, amp=amp, channels_last=True, lr_change_at=6)
    tolerance = 1e-4 if amp == "fp32" else 2e-2
    assert_close_models(graphed, eager, atol=tolerance)
    for got, want in zip(graphed_totals, eager_totals):
        assert torch.allclose(got, want, atol=tolerance * 32, rtol=tolerance)


@needs_cuda
def test_compiled_step_equals_eager_on_cuda(exact_cuda_float32):
    cuda = torch.device("cuda")
    data = batches([32] * 4 + [7], device=cuda)
    eager, _ = train("eager", data, device=cuda, channels_last=True)
    compiled, _ = train("compile", data, device=cuda, channels_last=True)
    assert_close_models(compiled, eager, atol=1e-4)


@needs_cuda
def test_graph_capture_survives_a_pinning_dataloader_thread():
    """A DataLoader with pinned memory stages batches from its own thread while the step is captured; the capture
    is thread-local, so those CUDA calls neither break it nor end up in it."""
    cuda = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(640, 1, 8, 8, generator=generator), torch.randint(0, 4, (640,),
                                                                                          generator=generator))
    train = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2, pin_memory=True, generator=generator)
    model = tiny_resnet(cuda)
    runtime = Runtime(cuda, amp="bf16", step="graph", channels_last=True)
    history = fit(model, train, [], sgd(model, 0.05, 0.9, 5e-4), runtime=runtime, epochs=3)
    assert len(history) == 3 and all(math.isfinite(record.train_loss) for record in history)
