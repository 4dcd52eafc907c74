"""A catalogue of bad inputs, each tried as a user would on a workspace whose pipeline already ran: the message
names the problem and the fix in one paragraph, no traceback shows, and no file of the workspace was written,
overwritten or removed.

Settings are checked by the validate stage, which `dvc repro` runs before any other stage; a few cases go through
real `dvc repro` to show that DVC then starts no stage (so removes no output), the rest run the stage scripts in
this process for speed. Data and checkpoint cases run the stage that reads them; disk cases mount real read-only
and full file systems (the tests run as root; they are skipped elsewhere); concurrency cases start real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Sequence

import pytest
import torch
import yaml

from pipeline.checkpoint import Architecture, load_checkpoint, save_checkpoint
from pipeline.models import create_model
from tiny_repo import environment, make_repo, run, stages_ran

TINY_MLP = {"model.name": "mlp7_linear", "model.options": {"width": 16, "depth": 3, "activation": "linear"},
            "pretrain.epochs": 1, "pretrain.milestones": [], "prune.layers": ["layers.[0-1]"], "prune.ratio": 0.5,
            "prune.reg.delta": 0.5, "prune.reg.stabilize_steps": 2, "retrain.epochs": 1, "retrain.milestones": [],
            "trainability.jsv_samples": 2, "evaluate.latency_repeats": 1, "evaluate.latency_batch_size": 8}
NOT_WORKSPACE = (".git", ".dvc/tmp", ".dvc/cache", "__pycache__")
NO_GPU = "this process has no usable CUDA GPU"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository copy whose whole pipeline ran once on a tiny MLP, with its work committed."""
    root = make_repo(tmp_path_factory.mktemp("bad-inputs"), TINY_MLP)
    run(["dvc", "repro"], root, TPP_PIPELINE_RUN="fixture")
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline ran"], root)
    return root


@pytest.fixture
def workspace(project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The project as the current folder; every workspace file is put back as it was afterwards."""
    monkeypatch.chdir(project)
    for name in ("DVC_ROOT", "MLFLOW_TRACKING_URI", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    saved = {path: path.read_bytes() for path in workspace_files(project)}
    yield project
    for path in workspace_files(project):
        if path not in saved:
            path.unlink()
    for path, data in saved.items():
        if not path.is_file() or path.read_bytes() != data:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)


def workspace_files(root: Path) -> list[Path]:
    """Every file of the workspace, leaving out git's and DVC's own bookkeeping."""
    files = []
    for path in sorted(root.rglob("*")):
        relative = f"/{path.relative_to(root).as_posix()}/"
        if path.is_file() and not any(relative.startswith(f"/{part}/") or f"/{part}/" in relative
                                      for part in NOT_WORKSPACE):
            files.append(path)
    return files


def snapshot(root: Path) -> Dict[str, str]:
    """Content hash of every workspace file, by path: equal snapshots mean nothing was written or removed."""
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in workspace_files(root)}


def edit_params(root: Path, change: Callable[[Dict[str, Any]], None]) -> None:
    """Change params.yaml the way a user edits it."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def setting(dotted: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    def change(params: Dict[str, Any]) -> None:
        *parents, leaf = dotted.split(".")
        for key in parents:
            params = params[key]
        params[leaf] = value
    return change


def removed(dotted: str) -> Callable[[Dict[str, Any]], None]:
    def change(params: Dict[str, Any]) -> None:
        *parents, leaf = dotted.split(".")
        for key in parents:
            params = params[key]
        del params[leaf]
    return change


def run_script(script: str, capsys: pytest.CaptureFixture, arguments: Sequence[str] = ()) -> str:
    """Run a stage script in this process as `python stages/<script>.py` would; it must refuse (exit status 2).
    Returns what it printed."""
    capsys.readouterr()
    argv = sys.argv
    sys.argv = [f"stages/{script}.py", *arguments]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(f"stages/{script}.py", run_name="__main__")
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert exit_info.value.code == 2, output
    return output


def assert_one_paragraph(output: str, *fragments: str) -> None:
    """The refusal is one paragraph holding every fragment, with no traceback."""
    assert "Traceback" not in output, output
    message = output[output.index("error:"):].strip()
    assert "\n\n" not in message, message
    flat = " ".join(message.split())
    for fragment in fragments:
        assert fragment in flat, (fragment, flat)


# ---------------------------------------------------------------------------------------------------- settings
SETTINGS_CASES = {
    "typo-in-key": (setting("prune.rati", 0.5), ["unknown key 'prune.rati'", "Did you mean 'prune.ratio'?"]),
    "typo-in-section": (lambda p: p.update(retrian=p.pop("retrain")), ["unknown key 'retrian'", "Did you mean 'retrain'?"]),
    "wrong-type": (setting("retrain.epochs", "ten"), ["'retrain.epochs'", "wrong type", "Expected int"]),
    "section-not-a-mapping": (setting("prune.reg", 0.5), ["'prune.reg' must be a mapping"]),
    "ratio-out-of-range": (setting("prune.ratio", 1.5), ["'prune.ratio' 1.5 is not a pruning ratio",
                                                         "[0, 1)"]),
    "negative-learning-rate": (setting("retrain.lr", -1.0), ["'retrain.lr' -1.0 must be greater than 0"]),
    "momentum-out-of-range": (setting("pretrain.momentum", 1.5), ["'pretrain.momentum' must be in [0, 1)"]),
    "milestone-past-last-epoch": (setting("retrain.milestones", [50]), ["'retrain.milestones'",
                                                                        "would never apply"]),
    "unknown-method": (setting("prune.method", "tppp"), ["'prune.method' 'tppp' is unknown",
                                                         "Did you mean 'tpp'?"]),
    "unknown-model": (setting("model.name", "resnet57"), ["'model.name' 'resnet57' is unknown", "resnet56"]),
    "unknown-dataset": (setting("data.name", "cifar11"), ["'data.name' 'cifar11' is unknown",
                                                          "Did you mean 'cifar10'?"]),
    "unknown-model-option": (setting("model.options.widht", 8), ["has no option 'widht'",
                                                                 "Did you mean 'width'?"]),
    "bad-model-option-value": (setting("model.options.activation", "relu6"), ["'activation'", "'relu6'",
                                                                             "Allowed values"]),
    "missing-key": (removed("prune.reg.alpha"), ["missing key 'prune.reg.alpha'", "add it"]),
    "no-layers-to-prune": (lambda p: p["prune"].update(layers=[], ratios={}), ["'prune.layers' is empty"]),
    "unknown-amp": (setting("amp", "fp8"), ["'amp' 'fp8' is not one of"]),
    "malformed-device": (setting("device", "gpu"), ["'device' 'gpu' is not a device", "cuda:N"]),
    "unknown-step-mode": (setting("trainer.step", "jit"), ["'trainer.step' 'jit' is not one of"]),
    "cuda-without-gpu": (setting("device", "cuda"), [NO_GPU, "device: auto"]),
    "graph-step-on-cpu": (setting("trainer.step", "graph"), ["'trainer.step' is 'graph'", "CUDA graphs",
                                                             "trainer.step: eager"]),
    "bf16-on-cpu": (setting("amp", "bf16"), ["'amp' is 'bf16'", "only supported on CUDA", "amp: auto"]),
    "mps-unavailable": (setting("device", "mps"), ["'mps'", "MPS is not available"]),
    "starting-checkpoint-missing": (setting("model.checkpoint", "data/weights.pth"),
                                    ["model.checkpoint is 'data/weights.pth', which does not exist"]),
    "starting-checkpoint-unseen-by-dvc": (setting("model.checkpoint", "params.yaml"),
                                          ["'params.yaml', outside everything the pretrain stage depends on",
                                           "would not rerun pretraining", "dvc add data"]),
    "batch-not-split-over-processes": (lambda p: (p["trainer"].update(devices=2), p["prune"].update(batch_size=63)),
                                       ["'prune.batch_size' is 63", "over 2 processes (trainer.devices × trainer.nodes)", "multiple of 2"]),
}


@pytest.mark.parametrize("case", SETTINGS_CASES, ids=list(SETTINGS_CASES))
def test_bad_setting_is_refused_by_the_first_stage(workspace: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    change, fragments = SETTINGS_CASES[case]
    edit_params(workspace, change)
    before = snapshot(workspace)
    output = run_script("validate", capsys)
    assert_one_paragraph(output, *fragments)
    assert snapshot(workspace) == before


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """This machine has no GPU: pretend it has `count`, for checks that only count them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.mark.parametrize("change, fragments", [
    (lambda p: (p.update(device="cuda"), p["trainer"].update(devices=4)),
     ["'trainer.devices' is 4", "1 CUDA GPU(s)", "at most 1"]),
    (setting("device", "cuda:3"), ["'device' is 'cuda:3'", "1 CUDA GPU(s)", "numbered from 0"]),
], ids=["more-processes-than-gpus", "gpu-index-out-of-range"])
def test_gpu_count_mismatch_is_refused(workspace: Path, capsys: pytest.CaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch, change: Callable, fragments: list) -> None:
    edit_params(workspace, change)
    fake_gpus(monkeypatch, 1)
    before = snapshot(workspace)
    assert_one_paragraph(run_script("validate", capsys), *fragments)
    assert snapshot(workspace) == before


def test_broken_yaml_is_refused(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    (workspace / "params.yaml").write_text("seed: 0\nprune: [unclosed\n")
    before = snapshot(workspace)
    assert_one_paragraph(run_script("validate", capsys), "params.yaml is not valid YAML at line 3",
                         "Check its syntax")
    assert snapshot(workspace) == before


def test_missing_params_file_is_refused(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    (workspace / "params.yaml").unlink()
    before = snapshot(workspace)
    assert_one_paragraph(run_script("validate", capsys), "params.yaml does not exist")
    assert snapshot(workspace) == before


@pytest.mark.parametrize("change, fragments", [
    (setting("prune.method", "tppp"), ["'prune.method' 'tppp' is unknown"]),
    (removed("retrain.lr"), ["missing key 'retrain.lr'"]),
    (setting("device", "cuda"), [NO_GPU]),
    (setting("prune.layers", ["conv*"]), ["'conv*' matches no Conv2d/Linear"]),
], ids=["unknown-method", "missing-key", "cuda-without-gpu", "pattern-matches-nothing"])
def test_dvc_repro_stops_at_validate_and_removes_no_output(workspace: Path, change: Callable,
                                                           fragments: list) -> None:
    """The issue's case: before, DVC removed the prune stage's outputs and then the stage refused the method."""
    edit_params(workspace, change)
    before = snapshot(workspace)
    code, output = run(["dvc", "repro"], workspace, check=False)
    assert code != 0
    assert stages_ran(output) == {"validate"}
    assert_one_paragraph(output[:output.index("ERROR: failed to reproduce")], *fragments)
    assert snapshot(workspace) == before


def test_dvc_repro_with_broken_yaml_removes_no_output(workspace: Path) -> None:
    """DVC reads params.yaml itself before any stage; its refusal is its own one-line message."""
    (workspace / "params.yaml").write_text("seed: 0\nprune: [unclosed\n")
    before = snapshot(workspace)
    code, output = run(["dvc", "repro"], workspace, check=False)
    assert code != 0
    assert stages_ran(output) == set()
    assert "params.yaml" in output and "Traceback" not in output
    assert snapshot(workspace) == before


# -------------------------------------------------------------------------------------------------------- data
def test_missing_dataset_is_refused(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    shutil.rmtree(workspace / "data" / "digits")
    before = snapshot(workspace)
    assert_one_paragraph(run_script("pretrain", capsys), "digits dataset is missing", "python -m pipeline.data")
    assert snapshot(workspace) == before


@pytest.mark.parametrize("damage", [lambda data: b"not an array" * 10, lambda data: data[:len(data) // 2]],
                         ids=["garbage", "truncated"])
def test_damaged_dataset_file_is_refused(workspace: Path, capsys: pytest.CaptureFixture,
                                         damage: Callable[[bytes], bytes]) -> None:
    path = workspace / "data" / "digits" / "train_images.npy"
    path.write_bytes(damage(path.read_bytes()))
    before = snapshot(workspace)
    assert_one_paragraph(run_script("pretrain", capsys), "cannot be read", "python -m pipeline.data")
    assert snapshot(workspace) == before


def test_dataset_not_downloaded_is_refused(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(workspace)
    output = run_script("pretrain", capsys, ["data.name=cifar10"])
    assert_one_paragraph(output, "CIFAR-10", "data.download")
    assert snapshot(workspace) == before


# ------------------------------------------------------------------------------------------------- checkpoints
def _other_classes(path: Path) -> None:
    checkpoint = load_checkpoint(path)
    architecture = Architecture(checkpoint.architecture.name, 5, checkpoint.architecture.input_shape,
                                checkpoint.architecture.options)
    save_checkpoint(path, architecture.build(), architecture, config=checkpoint.config, metrics=checkpoint.metrics)


def _other_architecture(path: Path) -> None:
    payload = torch.load(path, weights_only=True)
    payload["architecture"]["options"] = {**payload["architecture"]["options"], "width": 32}
    torch.save(payload, path)


CHECKPOINT_CASES: Mapping[str, tuple] = {
    "corrupted": ("prune", "models/dense.pt", lambda path: path.write_bytes(os.urandom(4096)),
                  ["not a readable checkpoint", "dvc checkout"]),
    "truncated": ("retrain", "models/pruned.pt", lambda path: path.write_bytes(path.read_bytes()[:1000]),
                  ["not a readable checkpoint", "dvc repro"]),
    "missing": ("evaluate", "models/final.pt", lambda path: path.unlink(), ["does not exist", "dvc pull"]),
    "not-ours": ("retrain", "models/pruned.pt", lambda path: torch.save({"weights": torch.zeros(3)}, path),
                 ["not a tpp-pipeline checkpoint"]),
    "pickled-module": ("prune", "models/dense.pt", lambda path: torch.save(torch.nn.Linear(2, 2), path),
                       ["not a readable checkpoint"]),
    "weights-of-another-architecture": ("retrain", "models/pruned.pt", _other_architecture,
                                        ["does not match its own architecture record"]),
    "other-classes": ("prune", "models/dense.pt", _other_classes, ["made for 5 classes", "gives 10 classes"]),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=list(CHECKPOINT_CASES))
def test_bad_checkpoint_is_refused(workspace: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    stage, name, damage, fragments = CHECKPOINT_CASES[case]
    damage(workspace / name)
    before = snapshot(workspace)
    assert_one_paragraph(run_script(stage, capsys), *fragments)
    assert snapshot(workspace) == before


# ------------------------------------------------------------------------------------- caught before any training
# The 25 cases that used to pass validate and fail in a later stage, after DVC had removed its outputs: now
# validate refuses each (the one stage that writes nothing until every check passed), and the workspace is intact.
def _write(relative: str, data: Callable[[], Any]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        value = data()
        if isinstance(value, bytes):
            path.write_bytes(value)
        else:
            torch.save(value, path)
    return damage


def _dense_of_another_architecture(root: Path) -> None:
    architecture = Architecture("mlp7_linear", 10, (1, 8, 8), {"width": 32, "depth": 3, "activation": "linear"})
    save_checkpoint(root / "models/dense.pt", architecture.build(), architecture, config={}, metrics={})


def _shorter_labels(root: Path) -> None:
    path = root / "data/digits/train_labels.npy"
    import numpy
    numpy.save(path, numpy.load(path)[:-7])


def _emptied(root: Path) -> None:
    for path in (root / "data/digits").iterdir():
        path.unlink()


OTHER_MLP = lambda: create_model("mlp7_linear", 10, in_channels=1, image_size=8, width=32, depth=3).state_dict()
def _model(name: str, **options: Any) -> Callable[[Path], None]:
    """Switch the workspace's params.yaml to another model (model.options is replaced, not merged)."""
    return lambda root: (edit_params(root, setting("model.name", name)),
                         edit_params(root, setting("model.options", options)))
BEFORE_TRAINING_CASES: Mapping[str, tuple] = {
    "layers-match-nothing": (None, ["prune.layers=[conv*]"], ["'conv*' matches no Conv2d/Linear", "layers.0"]),
    "ratios-match-nothing": (lambda root: edit_params(root, setting("prune.ratios", {"zzz": 0.5})), [],
                             ["'zzz' matches no Conv2d/Linear"]),
    "skip-matches-nothing": (None, ["prune.skip=[zzz]"], ["skip pattern 'zzz' matches no Conv2d/Linear"]),
    "pattern-matches-classifier": (None, ["prune.layers=[layers.2]"], ["'layers.2' produces the network's output"]),
    "first-conv-option-a": (_model("resnet20", shortcut="A"), ["prune.layers=[conv1]"],
                            ["'conv1' writes into a residual stream", "shortcut: B"]),
    "shortcut-coupled-conv": (_model("resnet20", shortcut="B"), ["prune.layers=[layer1.*.conv2]"],
                              ["share their output channels", "prune.skip"]),
    "default-pattern-on-mlp": (None, ["prune.layers=[*layer*.conv1]"], ["'*layer*.conv1' matches no Conv2d/Linear"]),
    "default-pattern-on-vgg11": (_model("vgg11"), ["prune.layers=[*layer*.conv1]"],
                                 ["'*layer*.conv1' matches no Conv2d/Linear", "features.0"]),
    "skip-covers-every-layer": (None, ["prune.skip=[layers.*]"], ["covers every layer", "would be the dense one"]),
    "pretrained-cifar-resnet": (_model("resnet20", shortcut="A"), ["model.pretrained=true"],
                                ["'resnet20' has no published weights", "model.checkpoint"]),
    "data-root-missing": (None, ["data.root=nowhere"], ["digits dataset is missing from nowhere/digits"]),
    "data-channels-2": (None, ["data.channels=2"], ["'data.channels' 2 is not supported"]),
    "cifar10-files-absent": (None, ["data.name=cifar10"], ["CIFAR-10 was not found", "data.download"]),
    "data-truncated": (lambda root: (root / "data/digits/train_images.npy").write_bytes(
        (root / "data/digits/train_images.npy").read_bytes()[:500]), [], ["cannot be read"]),
    "data-emptied": (_emptied, [], ["digits dataset is missing"]),
    "labels-not-matching-images": (_shorter_labels, [], ["do not match"]),
    "starting-checkpoint-corrupt": (_write("data/weights.pth", lambda: os.urandom(2048)),
                                    ["model.checkpoint=data/weights.pth"], ["not a readable PyTorch weights file"]),
    "starting-checkpoint-other-architecture": (_write("data/weights.pth", OTHER_MLP),
                                               ["model.checkpoint=data/weights.pth"], ["do not fit", "other shapes"]),
    "starting-checkpoint-text-file": (_write("data/weights.txt", lambda: b"these are not weights\n"),
                                      ["model.checkpoint=data/weights.txt"], ["not a readable PyTorch weights file"]),
    "dense-truncated": (lambda root: (root / "models/dense.pt").write_bytes(
        (root / "models/dense.pt").read_bytes()[:700]), [],
                        ["not a readable checkpoint", "dvc checkout models/dense.pt"]),
    "pruned-empty": (_write("models/pruned.pt", lambda: b""), [], ["models/pruned.pt is not a readable checkpoint",
                                                                    "delete it"]),
    "final-garbage": (_write("models/final.pt", lambda: os.urandom(4096)), [], ["models/final.pt is not a readable"]),
    "dense-plain-state-dict": (_write("models/dense.pt", OTHER_MLP), [], ["not a tpp-pipeline checkpoint",
                                                                           "dvc checkout models/dense.pt"]),
    "dense-of-another-architecture": (_dense_of_another_architecture, [],
                                      ["models/dense.pt holds a 'mlp7_linear' with options", "'width': 32",
                                       "pretrain settings did not change"]),
}


@pytest.mark.parametrize("case", BEFORE_TRAINING_CASES, ids=list(BEFORE_TRAINING_CASES))
def test_mistake_found_before_training_by_validate(workspace: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    damage, overrides, fragments = BEFORE_TRAINING_CASES[case]
    if damage is not None:
        damage(workspace)
    before = snapshot(workspace)
    assert_one_paragraph(run_script("validate", capsys, overrides), *fragments)
    assert snapshot(workspace) == before


def test_plan_figures_equal_what_the_prune_stage_produced(workspace: Path) -> None:
    from pipeline.plan.cli import plan_for_config
    from pipeline.settings import load_settings
    plan = plan_for_config(load_settings())
    metrics = json.loads((workspace / "metrics/prune.json").read_text())
    layers = json.loads((workspace / "models/pruned_layers.json").read_text())
    assert (plan.params_after, plan.macs_after) == (metrics["params"], metrics["macs"])
    assert {layer.name: layer.kept for layer in plan.layers} == {name: row["kept"] for name, row in layers.items()}


def test_damaged_data_under_dvc_repro_stops_at_validate(workspace: Path) -> None:
    """validate depends on data/, so DVC reruns it (and only it) when the data changed. DVC itself records the
    changed data folder in data.dvc first (the data is the user's input, not a stage output); nothing else moves."""
    path = workspace / "data/digits/train_images.npy"
    path.write_bytes(path.read_bytes()[:500])
    before = snapshot(workspace)
    code, output = run(["dvc", "repro"], workspace, check=False)
    assert code != 0 and stages_ran(output) == {"validate"}
    assert_one_paragraph(output[:output.index("ERROR: failed to reproduce")], "cannot be read")
    after = snapshot(workspace)
    assert {k: v for k, v in after.items() if k != "data.dvc"} == {k: v for k, v in before.items() if k != "data.dvc"}


# -------------------------------------------------------------------------------------------------- file system
@contextmanager
def mounted(target: Path, *options: str, source: str = "tmpfs") -> Iterator[None]:
    """A real mount over `target` for the duration (root only)."""
    result = subprocess.run(["mount", *options, source, str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()})")
    try:
        yield
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_read_only_output_folder_is_refused_before_any_work(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    before = snapshot(workspace)
    with mounted(workspace / "models", "--bind", "-o", "ro", source=str(workspace / "models")):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(workspace / "models")], check=True)
        output = run_script("retrain", capsys)
    assert_one_paragraph(output, "Could not write models", "Read-only file system", "remount it read-write")
    assert snapshot(workspace) == before


def test_full_disk_is_refused_before_any_work(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    plots = workspace / "plots"
    before = snapshot(workspace)
    with mounted(plots, "-t", "tmpfs", "-o", "size=4k"):
        with pytest.raises(OSError, match="No space left"):
            (plots / "filler").write_bytes(b"\0" * 65536)
        output = run_script("prune", capsys)
        (plots / "filler").unlink()
    assert_one_paragraph(output, "Could not write plots", "No space left on device", "free space")
    assert snapshot(workspace) == before


def test_read_only_settings_folder_is_refused_by_validate(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    edit_params(workspace, setting("retrain.lr", 0.02))
    before = snapshot(workspace)
    with mounted(workspace / "settings", "--bind", "-o", "ro", source=str(workspace / "settings")):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(workspace / "settings")], check=True)
        output = run_script("validate", capsys)
    assert_one_paragraph(output, "Could not write settings", "Read-only file system")
    assert snapshot(workspace) == before


# ------------------------------------------------------------------------------------------------- concurrency
@contextmanager
def frozen_once_printed(command: Sequence[str], cwd: Path, marker: str) -> Iterator[subprocess.Popen]:
    """Start `command`, wait until its output shows `marker`, then stop its whole process group (SIGSTOP), so it
    holds its locks while the test acts; resumed and awaited afterwards."""
    log = cwd / ".." / f"{cwd.name}-{os.getpid()}.log"
    with open(log, "w") as sink:
        process = subprocess.Popen(list(command), cwd=cwd, env=environment(PYTHONPATH=str(cwd)), stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while marker not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGSTOP)
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGCONT)
        process.wait(timeout=600)
        process.output = log.read_text()


def test_second_dvc_repro_in_the_same_workspace_is_refused(workspace: Path) -> None:
    edit_params(workspace, setting("evaluate.latency_repeats", 2))
    with frozen_once_printed(["dvc", "repro"], workspace, "Running stage 'validate'") as first:
        before = snapshot(workspace)
        code, output = run(["dvc", "repro"], workspace, check=False)
        assert snapshot(workspace) == before
    assert code != 0 and stages_ran(output) == set()
    assert "is busy, it is being blocked by" in output and f"(PID {first.pid})" in output and "rwlock" in output
    assert "Traceback" not in output
    assert first.returncode == 0, first.output
    assert stages_ran(first.output) == {"validate", "evaluate"}


STUDY = """name: twice
base: params.yaml
methods: {L1: {prune.method: l1}}
ratios: [0.5]
retrain: {short: {}}
seeds: [0]
"""


def test_study_run_twice_at_once_is_refused(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    from pipeline.study.runner import main as study_main

    study = workspace / "studies" / "twice.yaml"
    study.parent.mkdir(exist_ok=True)
    study.write_text(STUDY)
    with frozen_once_printed([sys.executable, "-m", "pipeline.study", "studies/twice.yaml"], workspace,
                             "cell 1/1") as first:
        before = snapshot(workspace)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            study_main(["studies/twice.yaml"])
        captured = capsys.readouterr()
        assert snapshot(workspace) == before
    assert exit_info.value.code == 2
    assert_one_paragraph(captured.out + captured.err, "this study is already running", "Wait for it to finish",
                         "--output")
    assert first.returncode == 0, first.output
    assert (workspace / "results" / "twice" / "report.md").is_file()
