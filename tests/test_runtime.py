"""The Runtime a stage resolves from its settings: every `auto` decided per device, impossible requests refused."""

import pytest
import torch

from pipeline.config import TrainerConfig
from pipeline.errors import ConfigError
from pipeline.runtime import configure_numerics, resolve_amp, resolve_runtime

CPU = torch.device("cpu")


def test_auto_settings_resolve_to_the_exact_fp32_cpu_path():
    runtime = resolve_runtime(TrainerConfig(), CPU, "auto")
    assert (runtime.amp, runtime.step, runtime.channels_last, runtime.is_main, runtime.distributed) == \
        ("fp32", "eager", False, True, False)


def test_auto_precision_is_bf16_on_cuda():
    assert resolve_amp("auto", torch.device("cuda")) == "bf16"
    assert resolve_amp("fp16", torch.device("cuda")) == "fp16"


def test_channels_last_can_be_asked_for_on_cpu():
    assert resolve_runtime(TrainerConfig(memory_format="channels_last"), CPU, "fp32").channels_last


@pytest.mark.parametrize("trainer, amp, message", [
    (TrainerConfig(step="graph"), "auto", "'trainer.step' is 'graph' but the stage runs on cpu"),
    (TrainerConfig(), "bf16", "'amp' is 'bf16' but the stage runs on cpu"),
])
def test_requests_this_device_cannot_serve_are_refused(trainer, amp, message):
    with pytest.raises(ConfigError, match=message):
        resolve_runtime(trainer, CPU, amp)


def test_tf32_follows_the_setting():
    configure_numerics(TrainerConfig(tf32=True), CPU)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    configure_numerics(TrainerConfig(tf32=False), CPU)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_cuda_autotunes_convolutions_unless_deterministic_and_a_later_run_inherits_nothing():
    """Only flags are set, so a CUDA device object is enough to check them on any machine."""
    cuda = torch.device("cuda")
    try:
        configure_numerics(TrainerConfig(), cuda)
        assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
        configure_numerics(TrainerConfig(deterministic=True), cuda)
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        configure_numerics(TrainerConfig(), CPU)
        assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False
