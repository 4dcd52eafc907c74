"""Deployment form: BatchNorm folding, ONNX export with a dynamic batch, ONNX Runtime equal to PyTorch."""

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from pipeline.measure.export import ExportError, check_onnx, export_onnx, fold_batchnorm, onnx_max_abs_diff
from pipeline.models import create_model
from pipeline.pruning.selection import select_filters
from pipeline.pruning.surgery import remove_filters

EXAMPLE = torch.zeros(1, 1, 8, 8)


def trained_looking(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folding has something to get wrong."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def pruned_resnet():
    model = trained_looking(create_model("resnet20", 10, in_channels=1, image_size=8))
    selection = select_filters(model, {"*layer*.conv1": 0.6}, example_inputs=EXAMPLE)
    return remove_filters(model, selection, EXAMPLE)


def test_folding_removes_every_batchnorm_and_keeps_the_outputs(pruned_resnet):
    folded = fold_batchnorm(pruned_resnet)
    inputs = torch.randn(16, 1, 8, 8)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    assert any(isinstance(module, nn.BatchNorm2d) for module in pruned_resnet.modules())
    assert torch.allclose(folded(inputs), pruned_resnet(inputs), atol=1e-5)
    assert not folded.training


def test_onnx_export_of_the_folded_pruned_network_matches_pytorch_at_any_batch(pruned_resnet, tmp_path):
    path = export_onnx(fold_batchnorm(pruned_resnet), EXAMPLE, tmp_path / "models" / "final.onnx")
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))
    for batch in (1, 5):
        assert check_onnx(path, pruned_resnet, torch.randn(batch, 1, 8, 8)) <= 1e-4


def test_the_onnx_file_names_no_local_path_so_any_checkout_writes_the_same_bytes(pruned_resnet, tmp_path):
    """The exporter annotates nodes with Python stack traces of absolute paths (the checkout, its environment);
    they are removed, and the module names and operator provenance stay."""
    path = export_onnx(fold_batchnorm(pruned_resnet), EXAMPLE, tmp_path / "final.onnx")
    content = path.read_bytes()
    assert str(Path(torch.__file__).parents[1]).encode() not in content and b"stack_trace" not in content
    keys = {entry.key for node in onnx.load(str(path)).graph.node for entry in node.metadata_props}
    assert "namespace" in keys
    assert path.read_bytes() == export_onnx(fold_batchnorm(pruned_resnet), EXAMPLE, tmp_path / "again.onnx").read_bytes()


def test_an_onnx_file_of_another_network_fails_the_check(pruned_resnet, tmp_path):
    path = export_onnx(pruned_resnet, EXAMPLE, tmp_path / "final.onnx")
    other = trained_looking(create_model("resnet20", 10, in_channels=1, image_size=8))
    remove_filters(other, select_filters(other, {"*layer*.conv1": 0.6}, example_inputs=EXAMPLE), EXAMPLE)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    inputs = torch.randn(4, 1, 8, 8)
    assert onnx_max_abs_diff(path, other, inputs) > 0.5
    with pytest.raises(ExportError, match="max abs difference"):
        check_onnx(path, other, inputs)


def test_a_network_torch_fx_cannot_trace_is_refused_with_the_reason():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ExportError, match="torch.fx can trace.*DataDependent"):
        fold_batchnorm(DataDependent())


def test_pruned_model_is_logged_to_mlflow_as_a_loadable_model_with_signature_and_tags(pruned_resnet, tmp_path,
                                                                                       monkeypatch):
    import mlflow
    import mlflow.pytorch
    from mlflow import MlflowClient

    from pipeline.tracking import RunGroup, track_stage
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    example = torch.randn(1, 1, 8, 8)
    with track_stage("evaluate", group=RunGroup("model-test", "pipeline", "tpp-pipeline")) as tracker:
        tracker.log_model(pruned_resnet, example.numpy(), tags={"sparsity": "0.4", "macs": "123"})
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tpp-pipeline")
    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == tracker.run_id
    assert models[0].tags["sparsity"] == "0.4" and models[0].tags["macs"] == "123"
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    loaded = mlflow.pytorch.load_model(models[0].model_uri)
    for batch in (example, torch.randn(5, 1, 8, 8)):
        assert torch.allclose(loaded(batch), pruned_resnet(batch), atol=1e-5)
    info = mlflow.models.get_model_info(models[0].model_uri)
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 8, 8)
