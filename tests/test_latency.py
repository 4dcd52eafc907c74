"""Latency measurement: interleaved rounds with warm-up excluded, median + IQR, every target on deployment-form
(BatchNorm-folded) networks, and the records the evaluate stage writes from it."""

import copy
import time

import pytest
import torch
from torch import nn

from pipeline.measure.latency import (LatencyComparison, compare, environment, graphed_forward, interleaved_times,
                                      interquartile_range, measure_targets, torch_forward)
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import remove_filters
from pipeline.report import latency_record, latency_table, summary_record

EXAMPLE = torch.zeros(1, 3, 8, 8)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def dense_and_pruned() -> tuple[nn.Module, nn.Module]:
    dense = small_cnn()
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


def test_speedup_is_the_median_of_paired_ratios():
    comparison = compare("sleep", 1, lambda: time.sleep(0.008), lambda: time.sleep(0.001), repeats=5,
                         synchronize=lambda: None)
    assert comparison.dense_ms >= 8 and comparison.pruned_ms >= 1
    assert comparison.speedup > 1.5
    assert comparison.dense_iqr_ms >= 0 and comparison.speedup_iqr >= 0


def test_measure_targets_times_eager_and_onnxruntime_at_each_batch_and_leaves_models_alone():
    dense, pruned = dense_and_pruned()
    state = {key: value.clone() for key, value in dense.state_dict().items()}
    results = measure_targets(dense, pruned, EXAMPLE, torch.device("cpu"), "fp32", [1, 8], repeats=3)
    assert [(r.target, r.batch_size) for r in results] == [("eager_cpu", 1), ("onnxruntime_cpu", 1),
                                                           ("eager_cpu", 8), ("onnxruntime_cpu", 8)]
    assert all(r.dense_ms > 0 and r.pruned_ms > 0 and r.speedup > 0 for r in results)
    assert any(isinstance(module, nn.BatchNorm2d) for module in dense.modules())
    assert all(torch.equal(value, state[key]) for key, value in dense.state_dict().items())


def test_a_subset_of_targets_is_timed_alone_and_cuda_only_targets_are_refused_on_the_cpu():
    dense, pruned = dense_and_pruned()
    results = measure_targets(dense, pruned, EXAMPLE, torch.device("cpu"), "fp32", [2], repeats=2,
                              targets=["eager"])
    assert [(r.target, r.batch_size) for r in results] == [("eager_cpu", 2)]
    with pytest.raises(ValueError, match=r"\['graph'\] are not available on cpu.*need CUDA"):
        measure_targets(dense, pruned, EXAMPLE, torch.device("cpu"), "fp32", [2], repeats=2, targets=["graph"])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs, torch.compile and CUDA timing "
                                                                       "need a GPU")


@needs_cuda
def test_cuda_adds_the_graph_and_compiled_targets_in_bf16_channels_last():
    dense, pruned = dense_and_pruned()
    results = measure_targets(dense, pruned, EXAMPLE, torch.device("cuda"), "bf16", [1, 64], repeats=3,
                              channels_last=True)
    assert [r.target for r in results] == ["eager_cuda", "onnxruntime_cpu", "graph_cuda", "compile_cuda"] * 2
    assert environment(torch.device("cuda"))["cuda"] is not None


@needs_cuda
def test_a_replayed_graph_computes_what_the_eager_forward_computes(exact_cuda_float32):
    model = small_cnn().cuda()
    batch = torch.randn(16, 3, 8, 8, device="cuda")
    replay = graphed_forward(model, batch, "fp32")
    assert torch.allclose(replay(), torch_forward(model, batch, "fp32")(), atol=1e-5)


def test_records_keep_times_apart_and_summarise_the_compared_numbers():
    comparisons = [LatencyComparison("eager_cpu", batch, 2.0, 0.1, 1.0, 0.05, 2.0, 0.2) for batch in (1, 16)]
    comparisons.append(LatencyComparison("onnxruntime_cpu", 16, 1.0, 0.1, 0.8, 0.05, 1.25, 0.1))
    latency = latency_record(comparisons, environment(torch.device("cpu")), 3.5, 2e-6)
    assert latency["targets"]["eager_cpu"]["batch_16"]["speedup"] == 2.0
    assert latency["torch"] == torch.__version__ and "onnxruntime" in latency
    metrics = {"dense_acc": 97.0, "pruned_acc": 96.0, "final_acc": 97.5, "speedup_macs": 3.5, "jsv_dense": 2.8,
               "jsv_pruned": 3.4, "jsv_final": 3.5}
    summary = summary_record(metrics, latency, 16)
    assert summary == {"dense_acc": 97.0, "pruned_acc": 96.0, "final_acc": 97.5, "speedup_macs": 3.5,
                       "speedup_eager_cpu": 2.0, "speedup_onnxruntime_cpu": 1.25, "jsv_dense": 2.8,
                       "jsv_pruned": 3.4, "jsv_final": 3.5}
    table = "\n".join(latency_table(latency))
    assert "| onnxruntime_cpu | 16 | 1.000 ± 0.100 | 0.800 ± 0.050 | 1.25× ± 0.10 | 3.50× |" in table
    assert "onnxruntime " + latency["onnxruntime"] in table
