"""The step modes of pipeline.training.step: eager is the loop's own step, compile and graph equal it."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Iterator, List, Optional, Tuple

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.config import RegularizerConfig
from pipeline.data import TensorBatches
from pipeline.errors import ConfigError
from pipeline.models import create_model
from pipeline.pruning.regularizer import TPPRegularizer
from pipeline.pruning.selection import select_filters
from pipeline.runtime import Runtime
from pipeline.training import step as step_module
from pipeline.training.loop import TrainingHooks, fit, sgd, milestone_schedule
from pipeline.training.step import build_step, train_step

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
Batch = Tuple[torch.Tensor, torch.Tensor]


def tiny_resnet(device: torch.device = CPU) -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", 4, in_channels=1, image_size=8).to(device)


def smooth_cnn(device: torch.device = CPU) -> nn.Module:
    """A small BN CNN with SiLU instead of ReLU, for comparing compiled steps with eager ones.

    torch.compile reorders float32 arithmetic (differences of ~3e-6 relative in gradients), and at a ReLU that
    can flip the sign of an activation lying that close to zero: the gradient then jumps. Measured on this
    machine's CPU with the tiny ResNet: one block output at 1.2e-6 flipped on the fourth step, and Inductor's
    gradient of that block's conv differed from eager's on the same weights by 1.9 %. A smooth activation keeps
    the difference at rounding size, so a tight tolerance can still catch a wrong LR, λ or batch."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU()),
        layer1=nn.Sequential(OrderedDict(conv1=nn.Conv2d(8, 16, 3, padding=1, bias=False), bn1=nn.BatchNorm2d(16),
                                         act1=nn.SiLU(), conv2=nn.Conv2d(16, 16, 3, stride=2, padding=1),
                                         bn2=nn.BatchNorm2d(16), act2=nn.SiLU())),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)))).to(device)


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
          channels_last: bool = False, lr_change_at: int = -1,
          batch_size: Optional[int] = None,
          build_model: Callable[[torch.device], nn.Module] = tiny_resnet) -> Tuple[nn.Module, List[torch.Tensor]]:
    """Train a fresh model (the tiny ResNet unless told) with TPP through `build_step` in `mode`; the per-step
    totals it returned."""
    model = build_model(device).train()
    hooks = tpp_hooks(model, data[0][0][:1])
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    runtime = Runtime(device, amp=amp, step=mode, channels_last=channels_last)
    step = build_step(model, optimizer, torch.amp.GradScaler(device.type, enabled=False), hooks, runtime,
                      batch_size)
    totals = []
    for index, (inputs, targets) in enumerate(data):
        if index == lr_change_at:
            optimizer.param_groups[0]["lr"] *= 0.1
        totals.append(step(inputs, targets).clone())
    assert hooks.iteration == len(data)
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
    expected = []
    for inputs, targets in data:
        expected.append(train_step(model, inputs, targets, optimizer, scaler, hooks, CPU, "fp32"))
        hooks.after_optimizer_step()
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
    """Three full batches (compiled), an LR change (no new graph) and a partial last batch (run eagerly).

    Slow: Inductor's C++ code generation for the step takes minutes on a 2-core machine (about 2 min here).
    """
    data = batches([16, 16, 16, 16, 5])
    eager, eager_totals = train("eager", data, lr_change_at=3, build_model=smooth_cnn)
    compiled, compiled_totals = train("compile", data, lr_change_at=3, build_model=smooth_cnn)
    assert_close_models(compiled, eager, atol=1e-5)
    for got, want in zip(compiled_totals, eager_totals):
        assert torch.allclose(got, want, atol=1e-4)


class CountingBackend:
    """A torch.compile backend that runs Dynamo's graphs as traced (Inductor's C++ build would take minutes here)
    and counts the graphs it compiled and their runs: Dynamo's caching and recompile limit are the same."""

    def __init__(self) -> None:
        self.compiled = 0
        self.runs = 0

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs: List[torch.Tensor]):
        self.compiled += 1

        def run(*args):
            self.runs += 1
            return graph_module.forward(*args)

        return run


@pytest.fixture
def backend(monkeypatch) -> Iterator[CountingBackend]:
    counting = CountingBackend()
    monkeypatch.setattr(step_module, "COMPILE_BACKEND", counting)
    yield counting
    torch._dynamo.reset()


class BackendLog(TrainingHooks):
    """The backend's counters after every step."""

    def __init__(self, backend: CountingBackend) -> None:
        self.backend = backend
        self.compiled: List[int] = []
        self.runs: List[int] = []

    def after_optimizer_step(self) -> None:
        self.compiled.append(self.backend.compiled)
        self.runs.append(self.backend.runs)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def mlp_batches(count: int = 40, batch_size: int = 16) -> TensorBatches:
    generator = torch.Generator().manual_seed(2)
    return TensorBatches(torch.randn(count, 1, 4, 4, generator=generator),
                         torch.randint(0, 4, (count,), generator=generator), batch_size, shuffle=True, seed=3)


def fit_mlp(mode: str, seed: int, hooks: TrainingHooks) -> nn.Module:
    """Two epochs of 16 + 16 + 8 samples, the LR divided by 10 after the first (a scheduler's change)."""
    model = tiny_mlp(seed)
    optimizer = sgd(model, 0.1, 0.9, 5e-4)
    fit(model, mlp_batches(count=40), [], optimizer, runtime=Runtime(CPU, step=mode), epochs=2,
        scheduler=milestone_schedule(optimizer, [1], 0.1), hooks=hooks)
    return model


def test_compiled_fits_in_one_process_recompile_a_bounded_number_of_times_and_never_fall_back(backend, recwarn):
    """A study runs dozens of fits in one process. Each compiles on its first two steps only (the second sees the
    momentum buffers), not at the LR change, and every fit is compiled: without a reset per fit they all pile up
    on one code object, and past Dynamo's recompile limit the step silently runs eagerly. The limit is lowered
    from 8 to 2 here so that two fits show what dozens would at 8."""
    fits = 2
    with torch._dynamo.config.patch(recompile_limit=2):
        compiled = fit_fits(backend, fits)
    assert step_module.recompile_limit_hits() == 0
    assert not [warning for warning in recwarn if "recompile limit" in str(warning.message)]
    eager = fit_mlp("eager", fits - 1, TrainingHooks())
    for name, value in eager.state_dict().items():
        assert torch.allclose(compiled.state_dict()[name], value, atol=1e-6), name


def fit_fits(backend: CountingBackend, fits: int) -> nn.Module:
    """`fits` compiled fits one after the other, each checked for when it compiled; the last model."""
    for seed in range(fits):
        before = (backend.compiled, backend.runs)
        log = BackendLog(backend)
        compiled = fit_mlp("compile", seed, log)
        assert log.compiled[1] > before[0], f"fit {seed} compiled nothing"
        assert log.compiled[-1] == log.compiled[1], f"fit {seed} recompiled after its second step: {log.compiled}"
        assert backend.runs > before[1], f"fit {seed} ran its full batches eagerly"
    return compiled


def test_a_compiled_step_that_falls_back_to_eager_says_so(backend):
    with torch._dynamo.config.patch(recompile_limit=1), pytest.warns(RuntimeWarning, match="recompile limit"):
        fit_mlp("compile", 0, TrainingHooks())


class ResumedEpoch:
    """Batches as a run resumed at an epoch's last batch sees them: the partial batch first, then full ones."""

    batch_size = 16

    def __init__(self) -> None:
        loader = mlp_batches(count=37)
        self.batches = [*list(loader)[2:], *list(loader)]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def test_the_full_batch_is_the_loaders_batch_size_not_the_first_batch_seen(backend):
    """After a resume the first batch may be an epoch's partial last one: the full batches that follow must be
    the compiled ones, and the partial ones run eagerly. The gradients are released after the fit."""
    model = tiny_mlp()
    log = BackendLog(backend)
    data = ResumedEpoch()
    fit(model, data, [], sgd(model, 0.1, 0.9, 0.0), runtime=Runtime(CPU, step="compile"), epochs=1, hooks=log)
    runs = [after - before for before, after in zip([0, *log.runs], log.runs)]
    sizes = [len(targets) for _, targets in data]
    assert sizes == [5, 16, 16, 5]
    assert [count > 0 for count in runs] == [False, True, True, False], runs
    assert all(parameter.grad is None for parameter in model.parameters())


def test_a_step_the_gradient_scaler_skips_does_not_advance_tpps_schedule():
    """fp16's GradScaler skips a step whose gradients overflowed (the weights stay); λ must not move either."""
    model = tiny_resnet().train()
    data = batches([16, 16, 16, 16])
    hooks = tpp_hooks(model, data[0][0][:1])
    optimizer = sgd(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    step = build_step(model, optimizer, scaler, hooks, Runtime(CPU))
    step(*data[0])
    before = {name: value.clone() for name, value in model.state_dict().items() if "conv" in name}
    step(torch.full_like(data[1][0], float("inf")), data[1][1])
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())
    step(*data[2])
    step(*data[3])
    assert scaler.get_scale() < 2.0 ** 8
    assert hooks.iteration == 3


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
    eager, _ = train("eager", data, device=cuda, channels_last=True, lr_change_at=3, build_model=smooth_cnn)
    compiled, _ = train("compile", data, device=cuda, channels_last=True, lr_change_at=3, build_model=smooth_cnn)
    assert_close_models(compiled, eager, atol=1e-4)


@needs_cuda
def test_a_graphed_step_resumed_on_a_partial_batch_captures_the_full_ones(monkeypatch, exact_cuda_float32):
    """The loader's batch size, not the first batch seen, decides what is captured."""
    cuda = torch.device("cuda")
    captures = []
    capture = step_module.capture
    monkeypatch.setattr(step_module, "capture", lambda work: captures.append(1) or capture(work))
    data = batches([7] + [32] * 6 + [7], device=cuda)
    eager, _ = train("eager", data, device=cuda)
    graphed, _ = train("graph", data, device=cuda, batch_size=32)
    assert len(captures) == 1
    assert_close_models(graphed, eager, atol=1e-4)


@needs_cuda
def test_graph_capture_survives_a_pinning_dataloader_thread(exact_cuda_float32):
    """A DataLoader with pinned memory stages batches from its own thread while the step is captured; the capture
    is thread-local, so those CUDA calls neither break it nor end up in it: the result equals the eager one."""
    cuda = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(640, 1, 8, 8, generator=generator), torch.randint(0, 4, (640,),
                                                                                          generator=generator))
    models = {}
    for mode in ("eager", "graph"):
        train = DataLoader(dataset, batch_size=32, shuffle=True, num_workers=2, pin_memory=True,
                           generator=torch.Generator().manual_seed(1))
        models[mode] = tiny_resnet(cuda)
        runtime = Runtime(cuda, step=mode, channels_last=True)
        history = fit(models[mode], train, [], sgd(models[mode], 0.05, 0.9, 5e-4), runtime=runtime, epochs=3)
        assert len(history) == 3 and all(math.isfinite(record.train_loss) for record in history)
    assert_close_models(models["graph"], models["eager"], atol=1e-4)
