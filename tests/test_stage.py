"""Stage plumbing: DVC output files are deterministic, so identical runs leave DVC nothing to record; a stage runs
with the settings DVC tracks for it (settings/<stage>.json), never with params.yaml."""

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, List, Sequence

import pytest
import yaml

from pipeline.config import Config
from pipeline.preflight import write_stage_settings
from pipeline.settings import load_settings
from pipeline.stage import run_stage, write_history, write_json
from pipeline.training.loop import EpochRecord
from tiny_repo import REPO, make_repo, run, set_params, stages_ran


def test_history_csv_leaves_out_wall_time_so_identical_runs_write_identical_files(tmp_path):
    fast = [EpochRecord(1, 23, 0.1, 0.5, 80.0, 0.4, 85.0, seconds=1.2)]
    slow = [EpochRecord(1, 23, 0.1, 0.5, 80.0, 0.4, 85.0, seconds=9.7)]
    write_history(tmp_path / "fast.csv", fast)
    write_history(tmp_path / "slow.csv", slow)
    assert (tmp_path / "fast.csv").read_bytes() == (tmp_path / "slow.csv").read_bytes()
    assert (tmp_path / "fast.csv").read_text().splitlines() == [
        "epoch,step,lr,train_loss,train_acc,test_loss,test_acc", "1,23,0.1,0.5,80.0,0.4,85.0"]


def test_outputs_are_written_whole_with_no_temporary_left_behind(tmp_path):
    write_json(tmp_path / "metrics" / "m.json", {"b": 1, "a": 2.5})
    assert (tmp_path / "metrics" / "m.json").read_text() == '{\n  "a": 2.5,\n  "b": 1\n}\n'
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["m.json"]


def test_history_csv_has_a_column_for_each_measurement_the_hooks_added(tmp_path):
    history = [EpochRecord(1, 23, 0.1, 0.5, 80.0, 0.4, 85.0, 1.0, {"mean_jsv": 2.5}),
               EpochRecord(2, 46, 0.1, 0.3, 90.0, 0.3, 88.0, 1.0, {"mean_jsv": 2.25})]
    write_history(tmp_path / "retrain.csv", history)
    assert (tmp_path / "retrain.csv").read_text().splitlines() == [
        "epoch,step,lr,train_loss,train_acc,test_loss,test_acc,mean_jsv", "1,23,0.1,0.5,80.0,0.4,85.0,2.5",
        "2,46,0.1,0.3,90.0,0.3,88.0,2.25"]


# --- a stage reads what DVC tracks --------------------------------------------------------------------------------


@pytest.fixture
def validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder whose params.yaml went through the validate stage (settings/*.json written), as cwd."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    write_stage_settings(load_settings(path=tmp_path / "params.yaml"), tmp_path / "settings")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    return tmp_path


def config_seen_by(stage: str, arguments: Sequence[str] = ()) -> Config:
    """The `Config` a stage's `main` receives from `run_stage`."""
    seen: List[Config] = []
    run_stage(seen.append, argv=list(arguments), stage=stage)
    return seen[0]


def edit_params(folder: Path, section: str, key: str, value: Any) -> None:
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params[section][key] = value
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_stage_runs_with_its_settings_file_not_with_a_params_yaml_edited_since_validate(validated: Path) -> None:
    edit_params(validated, "prune", "ratio", 0.5)

    config = config_seen_by("prune")

    assert config.prune.ratio == json.loads((validated / "settings/prune.json").read_text())["prune"]["ratio"] == 0.9


def test_run_only_settings_come_from_settings_run_json(validated: Path) -> None:
    (validated / "settings/run.json").write_text('{"data.num_workers": 0, "trainer.checkpoint_every": 7, "trainer.resume": false}\n')

    config = config_seen_by("retrain")

    assert (config.trainer.checkpoint_every, config.trainer.resume) == (7, False)


def test_a_debugging_override_applies_on_top_of_the_settings_file(validated: Path) -> None:
    assert config_seen_by("prune", ["prune.ratio=0.7", "prune.layers=[a, b]", "trainer.resume=false"]).prune.ratio == 0.7
    assert config_seen_by("prune", ["prune.layers=[a, b]"]).prune.layers == ["a", "b"]


def test_reading_a_setting_the_stage_does_not_depend_on_raises(validated: Path) -> None:
    config = config_seen_by("prune")

    with pytest.raises(RuntimeError, match=r"stage 'prune' read 'model.name', which is not in settings/prune.json"):
        _ = config.model.name
    assert config_seen_by("evaluate").model.name == "resnet56"


@pytest.mark.parametrize("arguments, setup, fragments", [
    (["model.name=resnet20"], None, ["Stage 'prune' does not read 'model.name'", "Set it in params.yaml"]),
    (["prune.ratio=1.5"], None, ["'prune.ratio' 1.5 is not a pruning ratio"]),
    (["prune.rati=0.5"], None, ["unknown key 'prune.rati'", "Did you mean 'prune.ratio'?"]),
    ([], lambda folder: (folder / "settings/prune.json").unlink(), ["prune.json does not exist", "dvc repro"]),
    ([], lambda folder: (folder / "settings/prune.json").write_text('{"seed": 0}'),
     ["holds other settings", "Run `dvc repro`"]),
], ids=["unread-key", "out-of-range", "typo", "settings-file-missing", "settings-file-of-other-code"])
def test_bad_override_or_settings_file_is_one_paragraph_and_exit_2(validated: Path, capsys: pytest.CaptureFixture,
                                                                   arguments: List[str], setup: Any,
                                                                   fragments: List[str]) -> None:
    if setup is not None:
        setup(validated)
    with pytest.raises(SystemExit) as exit_info:
        config_seen_by("prune", arguments)
    captured = capsys.readouterr()
    output = " ".join((captured.out + captured.err).split())
    assert exit_info.value.code == 2 and "Traceback" not in output
    for fragment in fragments:
        assert fragment in output


@pytest.mark.slow  # pretrain + prune of the tiny experiment under real DVC: about a minute
def test_dvc_repro_single_stage_after_a_params_edit_runs_what_dvc_lock_records(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    run(["dvc", "repro", "prune"], repo, TPP_PIPELINE_RUN="first")
    set_params(repo, {"prune.ratio": 0.25})

    _, output = run(["dvc", "repro", "-s", "-f", "prune"], repo, TPP_PIPELINE_RUN="second")

    assert stages_ran(output) == {"prune"}
    kept = json.loads((repo / "models/pruned_layers.json").read_text())
    assert {layer["pruned"] / layer["filters"] for layer in kept.values()} == {0.5}, "the ratio of settings/prune.json"
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    recorded = {dep["path"]: dep["md5"] for dep in lock["stages"]["prune"]["deps"]}
    assert recorded["settings/prune.json"] == hashlib.md5((repo / "settings/prune.json").read_bytes()).hexdigest()
    _, status = run(["dvc", "status"], repo)
    assert "validate" in status and "changed deps" in status
