"""Self-describing checkpoints: round trips, weights_only loading, and clear errors for bad files."""

import pytest
import torch

from pipeline.checkpoint import Architecture, check_matches_data, load_checkpoint, save_checkpoint
from pipeline.errors import CheckpointError
from pipeline.pruning.surgery import remove_filters
from pipeline.pruning.selection import select_filters

ARCH = Architecture("resnet20", 10, (1, 8, 8), {"shortcut": "A"})


def test_dense_round_trip_reproduces_outputs_and_records(tmp_path):
    model = ARCH.build().eval()
    digest = save_checkpoint(tmp_path / "dense.pt", model, ARCH, config={"seed": 3}, metrics={"test_acc": 91.5})
    loaded = load_checkpoint(tmp_path / "dense.pt")
    inputs = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.model.eval()(inputs), model(inputs))
    assert loaded.architecture == ARCH and loaded.pruned is None
    assert loaded.config == {"seed": 3} and loaded.metrics == {"test_acc": 91.5}
    assert len(digest) == 64
    raw = torch.load(tmp_path / "dense.pt", weights_only=True)
    assert raw["format"] == "tpp-pipeline/checkpoint"


def test_pruned_checkpoint_rebuilds_the_small_network_on_its_own(tmp_path):
    model = ARCH.build().eval()
    pruned = select_filters(model, {"*layer*.conv1": 0.75}, example_inputs=ARCH.example_inputs())
    remove_filters(model, pruned, ARCH.example_inputs())
    save_checkpoint(tmp_path / "pruned.pt", model, ARCH, pruned=pruned, config={}, metrics={})
    loaded = load_checkpoint(tmp_path / "pruned.pt")
    assert loaded.model.layer1[0].conv1.out_channels == 4
    assert {k: v.tolist() for k, v in loaded.pruned.items()} == {k: v.tolist() for k, v in pruned.items()}
    inputs = torch.randn(2, 1, 8, 8)
    assert torch.equal(loaded.model.eval()(inputs), model(inputs))


def test_missing_garbage_truncated_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*dvc repro"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "garbage.pt")
    save_checkpoint(tmp_path / "good.pt", ARCH.build(), ARCH, config={}, metrics={})
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "truncated.pt")
    torch.save(ARCH.build().state_dict(), tmp_path / "plain_state_dict.pt")
    with pytest.raises(CheckpointError, match="not a tpp-pipeline checkpoint"):
        load_checkpoint(tmp_path / "plain_state_dict.pt")


def test_architecture_mismatches_are_refused(tmp_path):
    save_checkpoint(tmp_path / "dense.pt", ARCH.build(), ARCH, config={}, metrics={})
    with pytest.raises(CheckpointError, match="holds a 'resnet20' network but 'resnet56' was expected"):
        load_checkpoint(tmp_path / "dense.pt", expected_model="resnet56")
    payload = torch.load(tmp_path / "dense.pt", weights_only=True)
    payload["architecture"]["name"] = "resnet32"
    torch.save(payload, tmp_path / "edited.pt")
    with pytest.raises(CheckpointError, match="does not match its own architecture record"):
        load_checkpoint(tmp_path / "edited.pt")
    loaded = load_checkpoint(tmp_path / "dense.pt")
    with pytest.raises(CheckpointError, match="made for 10 classes.*gives 100 classes"):
        check_matches_data(loaded, tmp_path / "dense.pt", 100, (1, 8, 8))
    check_matches_data(loaded, tmp_path / "dense.pt", 10, (1, 8, 8))


def model_config(**values):
    from pipeline.config import ModelConfig
    return ModelConfig(**{"name": "resnet18", "options": {}, **values})


TV_ARCH = Architecture("resnet18", 10, (3, 32, 32), {})


def test_pretrained_start_loads_published_weights_and_keeps_a_fresh_head(monkeypatch):
    from torchvision.models._api import WeightsEnum

    from pipeline.checkpoint import dense_model
    from pipeline.models import create_model
    imagenet = create_model("resnet18", 1000).state_dict()
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *args, **kwargs: imagenet)
    model = dense_model(model_config(pretrained=True), TV_ARCH)
    assert torch.equal(model.conv1.weight, imagenet["conv1.weight"])
    assert model.fc.out_features == 10


def test_pretrained_start_offline_says_how_to_get_the_weights(monkeypatch):
    import urllib.error

    from torchvision.models._api import WeightsEnum

    from pipeline.checkpoint import dense_model
    from pipeline.errors import PipelineError

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(PipelineError, match="offline.*TORCH_HOME.*model.checkpoint") as caught:
        dense_model(model_config(pretrained=True), TV_ARCH)
    assert torch.hub.get_dir() in str(caught.value)


def test_pretrained_is_refused_for_a_model_without_published_weights():
    from pipeline.checkpoint import dense_model
    from pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match="'resnet20' has no published weights"):
        dense_model(model_config(name="resnet20", pretrained=True), ARCH)


def test_checkpoint_start_takes_our_dense_checkpoint_or_a_plain_state_dict(tmp_path):
    from pipeline.checkpoint import dense_model
    source = ARCH.build()
    save_checkpoint(tmp_path / "dense.pt", source, ARCH, config={}, metrics={})
    torch.save(source.state_dict(), tmp_path / "plain.pth")
    for name in ("dense.pt", "plain.pth"):
        model = dense_model(model_config(name="resnet20", options={"shortcut": "A"},
                                         checkpoint=str(tmp_path / name)), ARCH)
        assert all(torch.equal(value, source.state_dict()[key]) for key, value in model.state_dict().items())


def test_checkpoint_start_refuses_mismatched_pruned_or_missing_weights(tmp_path):
    from pipeline.checkpoint import dense_model
    start = model_config(name="resnet20", options={"shortcut": "A"})
    torch.save(Architecture("resnet32", 10, (1, 8, 8), {"shortcut": "A"}).build().state_dict(), tmp_path / "r32.pth")
    with pytest.raises(CheckpointError, match="do not fit.*unexpected.*layer1.3"):
        dense_model(model_config(**{**start.__dict__, "checkpoint": str(tmp_path / "r32.pth")}), ARCH)
    wide = Architecture("resnet20", 10, (3, 8, 8), {"shortcut": "A"}).build()
    torch.save(wide.state_dict(), tmp_path / "rgb.pth")
    with pytest.raises(CheckpointError, match="other shapes at \\['conv1.weight'\\]"):
        dense_model(model_config(**{**start.__dict__, "checkpoint": str(tmp_path / "rgb.pth")}), ARCH)
    model = ARCH.build().eval()
    selection = select_filters(model, {"*layer*.conv1": 0.5}, example_inputs=ARCH.example_inputs())
    remove_filters(model, selection, ARCH.example_inputs())
    save_checkpoint(tmp_path / "pruned.pt", model, ARCH, pruned=selection, config={}, metrics={})
    with pytest.raises(CheckpointError, match="holds a pruned 'resnet20'"):
        dense_model(model_config(**{**start.__dict__, "checkpoint": str(tmp_path / "pruned.pt")}), ARCH)
    with pytest.raises(CheckpointError, match="does not exist"):
        dense_model(model_config(**{**start.__dict__, "checkpoint": str(tmp_path / "absent.pt")}), ARCH)


def test_checkpoints_are_read_onto_the_cpu_whatever_device_wrote_them(tmp_path, monkeypatch):
    save_checkpoint(tmp_path / "dense.pt", ARCH.build(), ARCH, config={}, metrics={})
    seen = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: seen.append(kwargs) or real_load(*args, **kwargs))
    loaded = load_checkpoint(tmp_path / "dense.pt")
    assert seen[0]["map_location"] == "cpu" and seen[0]["weights_only"] is True
    assert {parameter.device.type for parameter in loaded.model.parameters()} == {"cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU to write a checkpoint from CUDA tensors")
def test_a_checkpoint_written_from_cuda_loads_on_the_cpu(tmp_path):
    model = ARCH.build().cuda()
    save_checkpoint(tmp_path / "dense.pt", model, ARCH, config={}, metrics={})
    raw = torch.load(tmp_path / "dense.pt", weights_only=True, map_location="cpu")
    assert all(value.device.type == "cpu" for value in raw["state_dict"].values())
    loaded = load_checkpoint(tmp_path / "dense.pt", device=torch.device("cpu"))
    inputs = torch.randn(2, 1, 8, 8)
    assert torch.allclose(loaded.model.eval()(inputs), model.eval()(inputs.cuda()).cpu(), atol=1e-5)


def test_one_starting_point_at_a_time_and_pretrained_is_a_key_of_its_own():
    from pathlib import Path

    import yaml

    from pipeline.config import config_from_mapping
    from pipeline.errors import ConfigError
    shipped = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    params = yaml.safe_load(shipped)
    params["model"].update(pretrained=True, checkpoint="weights.pth")
    with pytest.raises(ConfigError, match="'model.checkpoint' is set while model.pretrained is true"):
        config_from_mapping(params)
    params = yaml.safe_load(shipped)
    params["model"]["options"]["pretrained"] = True
    with pytest.raises(ConfigError, match="'model.options.pretrained' is no longer a model option.*model.pretrained"):
        config_from_mapping(params)
