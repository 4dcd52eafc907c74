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
