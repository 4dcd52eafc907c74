"""Model sources: torchvision/<name>, timm/<name> and the user's own factory, with options checked and the source
recorded in checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import Architecture, load_checkpoint, save_checkpoint
from pipeline.errors import ConfigError
from pipeline.models import create_model
from pipeline.models.sources import pretrained_state_dict, source_record
from pipeline.settings import load_settings


def _logits(spec: str, **options: object) -> torch.Tensor:
    model = create_model(spec, 10, in_channels=3, image_size=32, **options).eval()
    with torch.no_grad():
        return model(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("spec", ["torchvision/squeezenet1_1", "timm/resnet18", "nets_fixture.make_net"])
def test_every_source_builds_a_ten_class_network(spec: str) -> None:
    assert _logits(spec).shape == (1, 10)


def test_factory_options_reach_the_callable() -> None:
    model = create_model("nets_fixture.make_net", 10, width=4)
    assert model.a.out_channels == 4


@pytest.mark.parametrize(("spec", "options", "fragments"), [
    ("nets_fixture.make_net", {"widht": 2}, ["model.options.widht", "Did you mean 'width'"]),
    ("nets_fixture.needs_depth", {}, ["needs the arguments ['depth']"]),
    ("nets_fixture.make_net", {"num_classes": 3}, ["model.options.num_classes", "passes num_classes itself"]),
    ("nets_fixture.mak_net", {}, ["no callable 'mak_net'", "Did you mean 'make_net'"]),
    ("nope_pkg.mod.fn", {}, ["no module 'nope_pkg'", "nets/"]),
    ("nets_fixture.returns_dict", {}, ["returned dict, not a plain nn.Module"]),
    ("timm/resnt18", {}, ["timm", "Did you mean 'resnet18'"]),
    ("timm/resnet18", {"widht": 2}, ["'timm/resnet18' does not accept", "widht"]),
    ("torchvision/resnet1", {}, ["torchvision", "'resnet18'"]),
])
def test_bad_source_or_option_is_a_config_error(spec: str, options: dict, fragments: list) -> None:
    with pytest.raises(ConfigError) as caught:
        create_model(spec, 10, **options)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_factory_whose_module_lacks_a_dependency_names_the_dependency(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken_net.py").write_text("import not_installed_pkg_xyz\n\ndef make(num_classes):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="imports 'not_installed_pkg_xyz', which is not installed"):
        create_model("broken_net.make", 10)


def test_name_and_factory_are_exclusive_and_overrides_parse() -> None:
    config = load_settings(["model.name=null", "model.factory=nets.example.small_cnn", "model.options={}"])
    assert config.model.factory == "nets.example.small_cnn"
    assert load_settings(["model.name=timm/resnet18", "model.options={}"]).model.name == "timm/resnet18"
    with pytest.raises(ConfigError, match="model.factory"):
        load_settings(["model.factory=nets.example.small_cnn"])
    with pytest.raises(ConfigError, match="Did you mean"):
        load_settings(["model.name=timm/resnt18", "model.options={}"])


def test_checkpoint_records_the_source_and_rebuilds_a_factory_model(tmp_path: Path) -> None:
    architecture = Architecture("nets_fixture.make_net", 10, (3, 16, 16), {"width": 4})
    model = architecture.build()
    save_checkpoint(tmp_path / "c.pt", model, architecture, config={}, metrics={})
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    assert payload["source"]["source"] == "factory"
    assert payload["source"]["file"].endswith("nets_fixture.py") and len(payload["source"]["sha256"]) == 64
    assert source_record("timm/resnet18")["source"] == "timm"
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded.model.a.weight, model.a.weight)


def test_pretrained_for_a_model_without_published_weights_is_refused() -> None:
    with pytest.raises(ConfigError, match="no published weights"):
        pretrained_state_dict("resnet56")


def test_pretrained_timm_offline_points_to_model_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm, "create_model", _offline)
    with pytest.raises(Exception, match="model.checkpoint: data/weights/resnet18.pth"):
        pretrained_state_dict("timm/resnet18")


def _offline(*args: object, **kwargs: object) -> None:
    raise OSError("We have no connection or you passed local_files_only, so the hub cannot be reached")
