"""Artifact sharing through a DVC remote, as between a GPU machine and a laptop: run the tiny pipeline in one clone,
`dvc push` to a local-directory remote; in a fresh clone `dvc pull` restores every output, `dvc status` is clean and
`dvc repro` recomputes nothing."""

import json

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from tiny_repo import make_repo, run, stages_ran

# Slow (minutes): a whole pipeline run, `dvc push` and a fresh clone's `dvc pull`.
# `make test-slow` and CI run them.
pytestmark = pytest.mark.slow

SHARED_OUTPUTS = ("models/dense.pt", "models/pruned.pt", "models/final.pt", "models/final.onnx",
                  "models/pruned_layers.json", "metrics/evaluate.json", "metrics/latency.json",
                  "metrics/summary.json", "reports/report.md", "plots/retrain.csv")


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    """The 'GPU machine': a clone that ran the pipeline, committed dvc.lock and pushed to the remote."""
    origin = make_repo(tmp_path_factory.mktemp("gpu_machine"))
    remote = tmp_path_factory.mktemp("remote")
    run(["dvc", "remote", "add", "-d", "shared", str(remote)], origin)
    run(["dvc", "add", "data"], origin)
    _, output = run(["dvc", "repro"], origin)
    assert "evaluate" in stages_ran(output)
    run(["git", "add", "-A"], origin)
    run(["git", "commit", "-qm", "results"], origin)
    run(["dvc", "push"], origin)
    return origin, remote


def test_fresh_clone_pulls_every_output_and_recomputes_nothing(pushed, tmp_path):
    origin, _ = pushed
    laptop = tmp_path / "laptop"
    run(["git", "clone", "-q", str(origin), str(laptop)], tmp_path)
    assert not (laptop / "models/final.pt").exists()
    run(["dvc", "pull"], laptop)
    for path in SHARED_OUTPUTS:
        assert (laptop / path).read_bytes() == (origin / path).read_bytes(), path
    _, status = run(["dvc", "status"], laptop)
    assert "Data and pipelines are up to date" in status, status
    _, output = run(["dvc", "repro"], laptop)
    assert stages_ran(output) == set(), output
    summary = json.loads((laptop / "metrics/summary.json").read_text())
    assert {"dense_acc", "pruned_acc", "final_acc", "speedup_macs", "speedup_onnxruntime_cpu"} <= set(summary)


def test_pulled_checkpoint_loads_on_the_cpu_and_matches_its_onnx_export(pushed, tmp_path):
    from pipeline.measure.export import onnx_max_abs_diff
    origin, _ = pushed
    final = load_checkpoint(origin / "models/final.pt", device=torch.device("cpu"))
    inputs = torch.randn(3, *final.architecture.input_shape)
    assert onnx_max_abs_diff(origin / "models/final.onnx", final.model.eval(), inputs) <= 1e-4
