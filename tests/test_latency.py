"""Latency measurement: interleaved rounds with warm-up excluded, median + IQR, every target timing the dense and the
pruned network in deployment form (BatchNorm folded), a failing target recorded instead of failing the stage, and
the records the evaluate stage writes from it."""

import copy
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import Config, EvaluateConfig, validate
from pipeline.errors import ConfigError
from pipeline.measure import latency
from pipeline.measure.latency import (LatencyComparison, compare, environment, graphed_forward, interleaved_times,
                                      interquartile_range, measure_targets, split_targets, torch_forward)
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import remove_filters
from pipeline.report import latency_record, latency_table, summary_record

EXAMPLE = torch.zeros(1, 3, 8, 8)
CPU = torch.device("cpu")


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def dense_and_pruned() -> Tuple[nn.Module, nn.Module]:
    dense = small_cnn()
    with torch.no_grad():   # BN statistics that are not the identity, so folding them has something to fold
        for module in dense.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    pruned = copy.deepcopy(dense)
    remove_filters(pruned, select_filters(pruned, {"0": 0.75, "3": 0.75}, example_inputs=EXAMPLE), EXAMPLE)
    return dense, pruned


def test_iqr_is_the_spread_between_quartiles():
    assert interquartile_range([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2.0)
    assert interquartile_range([7.0]) == 0.0


def test_rounds_alternate_order_and_warmup_calls_are_not_timed():
    calls = []
    dense_times, pruned_times = interleaved_times(lambda: calls.append("d"), lambda: calls.append("p"), repeats=4,
                                                  synchronize=lambda: None, warmup=2)
    assert len(dense_times) == len(pruned_times) == 4
    assert calls == ["d", "p", "d", "p"] + ["d", "p", "p", "d", "d", "p", "p", "d"]


def test_compare_reports_medians_iqrs_and_the_median_of_paired_ratios(monkeypatch):
    """On a fake clock each call takes a known time: dense 2, 4, 6, 8, 10 ms by round (after three untimed
    warm-up calls of 100 ms), pruned always 1 ms, so every figure is known exactly."""
    clock = [0.0]
    monkeypatch.setattr(latency.time, "perf_counter", lambda: clock[0])
    dense_ms = iter([100, 100, 100, 2, 4, 6, 8, 10])

    def dense() -> None:
        clock[0] += next(dense_ms) / 1e3

    def pruned() -> None:
        clock[0] += 1 / 1e3

    comparison = compare("fake", 1, dense, pruned, repeats=5, synchronize=lambda: None)
    assert comparison.dense_ms == pytest.approx(6.0) and comparison.dense_iqr_ms == pytest.approx(4.0)
    assert comparison.pruned_ms == pytest.approx(1.0) and comparison.pruned_iqr_ms == pytest.approx(0.0)
    assert comparison.speedup == pytest.approx(6.0) and comparison.speedup_iqr == pytest.approx(4.0)


class TimedForwards:
    """Spies on `compare`: the forwards each target timed, dense first, as the measurement received them."""

    def __init__(self, monkeypatch) -> None:
        self.timed: Dict[Tuple[str, int], Tuple] = {}
        real = latency.compare

        def spy(target, batch_size, dense, pruned, repeats, synchronize):
            self.timed[(target, batch_size)] = (dense, pruned)
            return real(target, batch_size, dense, pruned, repeats, synchronize)

        monkeypatch.setattr(latency, "compare", spy)


def outputs(forward) -> torch.Tensor:
    result = forward()
    return torch.as_tensor(np.asarray(result)) if isinstance(result, np.ndarray) else result.float().cpu()


def reference(model: nn.Module, batch_size: int, device: torch.device = CPU) -> torch.Tensor:
    """The unfolded network's output on the batch the measurement times."""
    with torch.no_grad():
        return model.to(device)(latency._batch(EXAMPLE, batch_size).to(device)).float().cpu()


def test_every_target_times_the_dense_and_the_pruned_network_and_leaves_them_alone(monkeypatch):
    dense, pruned = dense_and_pruned()
    state = {key: value.clone() for key, value in dense.state_dict().items()}
    spy = TimedForwards(monkeypatch)
    results = measure_targets(dense, pruned, EXAMPLE, CPU, "fp32", [1, 8], repeats=3)
    assert [(r.target, r.batch_size) for r in results.comparisons] == [("eager_cpu", 1), ("onnxruntime_cpu", 1),
                                                                       ("eager_cpu", 8), ("onnxruntime_cpu", 8)]
    assert results.failed == {}
    assert not torch.allclose(reference(dense, 8), reference(pruned, 8), atol=1e-2)
    for (target, batch_size), (timed_dense, timed_pruned) in spy.timed.items():
        assert torch.allclose(outputs(timed_dense), reference(dense, batch_size), atol=1e-4), target
        assert torch.allclose(outputs(timed_pruned), reference(pruned, batch_size), atol=1e-4), target
    assert all(torch.equal(value, state[key]) for key, value in dense.state_dict().items())


def test_a_failing_target_is_recorded_with_its_error_and_the_others_are_still_timed(monkeypatch):
    """E.g. `torch.compile` on a GPU machine without a C compiler for Triton, or an export that fails: the evaluate
    stage goes on with the other targets."""
    dense, pruned = dense_and_pruned()

    def no_exporter(model, example, path):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.\nmore")

    monkeypatch.setattr(latency, "export_onnx", no_exporter)
    with pytest.warns(RuntimeWarning, match="onnxruntime_cpu latency target failed"):
        results = measure_targets(dense, pruned, EXAMPLE, CPU, "fp32", [1, 4], repeats=2)
    assert results.failed == {"onnxruntime_cpu": "RuntimeError: Failed to find C compiler. Please specify via CC "
                                                  "environment variable."}
    assert [(r.target, r.batch_size) for r in results.comparisons] == [("eager_cpu", 1), ("eager_cpu", 4)]
    record = latency_record(results.comparisons, environment(CPU), 3.0, 1e-6, failed=results.failed,
                            skipped={"graph": "needs CUDA"})
    assert record["failed"] == results.failed and record["skipped"] == {"graph": "needs CUDA"}
    assert "| onnxruntime_cpu | | failed: RuntimeError: Failed to find C compiler" in "\n".join(latency_table(record))
    metrics = {"dense_acc": 97.0, "pruned_acc": 96.0, "final_acc": 97.5, "speedup_macs": 3.0}
    assert set(summary_record(metrics, record, 4)) == {"dense_acc", "pruned_acc", "final_acc", "speedup_macs",
                                                       "speedup_eager_cpu"}


def test_a_target_failing_at_a_later_batch_size_is_left_out_at_every_batch_size(monkeypatch):
    """Otherwise the summary would look for a batch the target lacks."""
    dense, pruned = dense_and_pruned()
    real = latency.torch_forward

    def fails_at_four(model, batch, amp):
        if len(batch) == 4:
            raise RuntimeError("capture failed")
        return real(model, batch, amp)

    monkeypatch.setitem(latency.FORWARDS, "eager", fails_at_four)
    with pytest.warns(RuntimeWarning):
        results = measure_targets(dense, pruned, EXAMPLE, CPU, "fp32", [1, 4], repeats=2, targets=["eager"])
    assert results.comparisons == [] and results.failed == {"eager_cpu": "RuntimeError: capture failed"}


def test_a_subset_of_targets_is_timed_alone_and_cuda_only_targets_are_refused_on_the_cpu():
    dense, pruned = dense_and_pruned()
    results = measure_targets(dense, pruned, EXAMPLE, CPU, "fp32", [2], repeats=2, targets=["eager"])
    assert [(r.target, r.batch_size) for r in results.comparisons] == [("eager_cpu", 2)]
    with pytest.raises(ValueError, match=r"\['graph'\] are not available on cpu.*need CUDA"):
        measure_targets(dense, pruned, EXAMPLE, CPU, "fp32", [2], repeats=2, targets=["graph"])


def test_the_targets_setting_names_what_is_timed_where_it_can_be_and_why_not_elsewhere():
    assert split_targets(["compile", "eager", "graph"], CPU) == (("eager",), {
        "compile": "needs CUDA; the evaluation ran on cpu", "graph": "needs CUDA; the evaluation ran on cpu"})
    assert split_targets(["graph", "onnxruntime"], torch.device("cuda")) == (("onnxruntime", "graph"), {})


@pytest.mark.parametrize("targets, message", [(["eager", "tensorrt"], r"\['tensorrt'\] are not latency targets"),
                                              ([], "at least one target"), (["eager", "eager"], "each once")])
def test_bad_targets_settings_are_refused_naming_the_key(targets, message):
    with pytest.raises(ConfigError, match=rf"'evaluate.targets' .*{message}"):
        validate(Config(evaluate=EvaluateConfig(targets=targets)))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs, torch.compile and CUDA timing "
                                                                       "need a GPU")


@needs_cuda
def test_cuda_graph_and_compiled_targets_time_the_dense_and_pruned_networks_in_bf16_channels_last(monkeypatch):
    dense, pruned = dense_and_pruned()
    spy = TimedForwards(monkeypatch)
    cuda = torch.device("cuda")
    results = measure_targets(dense, pruned, EXAMPLE, cuda, "bf16", [1, 64], repeats=3, channels_last=True)
    assert results.failed == {}
    assert [r.target for r in results.comparisons] == ["eager_cuda", "onnxruntime_cpu", "graph_cuda",
                                                       "compile_cuda"] * 2
    for (target, batch_size), (timed_dense, timed_pruned) in spy.timed.items():
        tolerance = 1e-4 if target == "onnxruntime_cpu" else 5e-2   # bf16 on the GPU
        assert torch.allclose(outputs(timed_dense), reference(dense, batch_size), atol=tolerance), target
        assert torch.allclose(outputs(timed_pruned), reference(pruned, batch_size), atol=tolerance), target
    assert environment(cuda)["cuda"] is not None


@needs_cuda
def test_a_replayed_graph_computes_what_the_eager_forward_computes(exact_cuda_float32):
    model = small_cnn().cuda()
    batch = torch.randn(16, 3, 8, 8, device="cuda")
    replay = graphed_forward(model, batch, "fp32")
    assert torch.allclose(replay(), torch_forward(model, batch, "fp32")(), atol=1e-5)


def test_records_keep_times_apart_and_summarise_the_compared_numbers():
    comparisons = [LatencyComparison("eager_cpu", batch, 2.0, 0.1, 1.0, 0.05, 2.0, 0.2) for batch in (1, 16)]
    comparisons.append(LatencyComparison("onnxruntime_cpu", 16, 1.0, 0.1, 0.8, 0.05, 1.25, 0.1))
    record = latency_record(comparisons, environment(CPU), 3.5, 2e-6)
    assert record["targets"]["eager_cpu"]["batch_16"]["speedup"] == 2.0
    assert record["torch"] == torch.__version__ and "onnxruntime" in record
    assert record["failed"] == {} and record["skipped"] == {}
    metrics = {"dense_acc": 97.0, "pruned_acc": 96.0, "final_acc": 97.5, "speedup_macs": 3.5, "jsv_dense": 2.8,
               "jsv_pruned": 3.4, "jsv_final": 3.5}
    summary = summary_record(metrics, record, 16)
    assert summary == {"dense_acc": 97.0, "pruned_acc": 96.0, "final_acc": 97.5, "speedup_macs": 3.5,
                       "speedup_eager_cpu": 2.0, "speedup_onnxruntime_cpu": 1.25, "jsv_dense": 2.8,
                       "jsv_pruned": 3.4, "jsv_final": 3.5}
    table = "\n".join(latency_table(record))
    assert "| onnxruntime_cpu | 16 | 1.000 ± 0.100 | 0.800 ± 0.050 | 1.25× ± 0.10 | 3.50× |" in table
    assert "onnxruntime " + record["onnxruntime"] in table
