"""The Runtime a stage resolves from its settings: every `auto` decided per device, impossible requests refused, and
a GPU that is present but unusable said plainly."""

import warnings

import pytest
import torch

from pipeline import runtime
from pipeline.config import TrainerConfig
from pipeline.errors import ConfigError
from pipeline.runtime import configure_numerics, resolve_amp, resolve_device, resolve_runtime

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
DRIVER_535 = ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  535.104.05  Release Build  "
              "(dvs-builder@U16-I3-B03-4-3)  Thu Jul 24 13:37:55 UTC 2025\nGCC version:  gcc version 12.3.0\n")


@pytest.fixture(autouse=True)
def fresh_warnings():
    runtime._warn_once.cache_clear()
    yield
    runtime._warn_once.cache_clear()


def test_auto_settings_resolve_to_the_exact_fp32_cpu_path():
    resolved = resolve_runtime(TrainerConfig(), CPU, "auto")
    assert (resolved.amp, resolved.step, resolved.channels_last, resolved.is_main, resolved.distributed) == \
        ("fp32", "eager", False, True, False)


def gpu(monkeypatch, capability, name="NVIDIA Test GPU"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0), (12, 0)])
def test_auto_precision_is_bf16_where_the_gpu_computes_it_natively(monkeypatch, capability):
    gpu(monkeypatch, capability)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp("auto", CUDA) == "bf16"
    assert resolve_amp("fp16", CUDA) == "fp16"


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (6, 1)])
def test_auto_precision_is_fp32_on_a_gpu_that_would_emulate_bf16_and_says_why_once(monkeypatch, capability):
    gpu(monkeypatch, capability, "Tesla V100-SXM2-16GB")
    with pytest.warns(RuntimeWarning, match=rf"fp32 on Tesla V100.*{capability[0]}\.{capability[1]}.*no native bf16"):
        assert resolve_amp("auto", CUDA) == "fp32"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_amp("auto", CUDA) == "fp32"
    assert resolve_amp("bf16", CUDA) == "bf16"


def test_channels_last_can_be_asked_for_on_cpu():
    assert resolve_runtime(TrainerConfig(memory_format="channels_last"), CPU, "fp32").channels_last


@pytest.mark.parametrize("trainer, amp, message", [
    (TrainerConfig(step="graph"), "auto", "'trainer.step' is 'graph' but the stage runs on cpu"),
    (TrainerConfig(), "bf16", "'amp' is 'bf16' but the stage runs on cpu"),
])
def test_requests_this_device_cannot_serve_are_refused(trainer, amp, message):
    with pytest.raises(ConfigError, match=message):
        resolve_runtime(trainer, CPU, amp)


def test_a_later_run_inherits_no_numerics_setting_of_an_earlier_one():
    """A study configures numerics for run after run in one process: what a CUDA run with TF32 and deterministic
    algorithms set must all be undone by the next run's defaults."""
    try:
        configure_numerics(TrainerConfig(), CPU)
        baseline = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                    torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
        configure_numerics(TrainerConfig(tf32=True, deterministic=True), CUDA)
        configure_numerics(TrainerConfig(), CPU)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == baseline
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = False


def driver(monkeypatch, tmp_path, text, cuda_build="13.0"):
    version_file = tmp_path / "version"
    version_file.write_text(text)
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_FILE", version_file)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)


def test_a_gpu_behind_a_driver_too_old_for_the_cuda_build_is_said_once_with_the_driver_needed(monkeypatch, tmp_path):
    driver(monkeypatch, tmp_path, DRIVER_535)
    with pytest.warns(RuntimeWarning, match=r"version 535\.104\.05.*CUDA 13\.0, which needs driver 580 or newer.*"
                                            r"runs every stage on the CPU"):
        assert resolve_device("auto") == CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match=r"'device' is 'cuda'.*needs driver 580 or newer"):
        resolve_device("cuda")


def test_a_recent_driver_without_a_visible_gpu_points_at_visibility_not_the_driver(monkeypatch, tmp_path):
    driver(monkeypatch, tmp_path, DRIVER_535.replace("535.104.05", "580.65.06"))
    with pytest.warns(RuntimeWarning, match=r"driver is recent enough.*CUDA_VISIBLE_DEVICES"):
        assert resolve_device("auto") == CPU


def test_no_nvidia_driver_means_no_word_about_gpus(monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "NVIDIA_DRIVER_FILE", tmp_path / "absent")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_device("auto") == CPU
    with pytest.raises(ConfigError, match="no usable CUDA GPU"):
        resolve_device("cuda")
