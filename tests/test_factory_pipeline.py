"""A user's own model in a nets/ folder under real `dvc repro`: it trains and prunes, the checkpoint records the
factory's file hash, and editing the factory's code reruns pretraining (DVC sees nets/ as a dependency)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_repo import TINY, make_repo, run, set_params, stages_ran

pytestmark = pytest.mark.slow

NET = '''from torch import nn


def make(num_classes: int, in_channels: int = 3, width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
'''
FACTORY = {**TINY, "model.name": None, "model.factory": "nets.mynet.make", "model.options": {"width": 8},
           "prune.layers": ["0", "3"]}


def test_editing_the_factory_reruns_pretraining(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, TINY)
    (repo / "nets" / "mynet.py").write_text(NET)
    set_params(repo, FACTORY)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "my own network"], repo)
    _, output = run(["dvc", "repro"], repo)
    assert {"validate", "pretrain", "prune"} <= stages_ran(output)
    source = torch.load(repo / "models" / "dense.pt", weights_only=True)["source"]
    assert source["source"] == "factory" and source["file"].endswith("nets/mynet.py")
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == set()
    (repo / "nets" / "mynet.py").write_text(NET.replace("num_classes))", "num_classes), nn.Identity())"))
    _, output = run(["dvc", "repro"], repo)
    assert "pretrain" in stages_ran(output)
