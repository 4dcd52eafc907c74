"""Tests of pipeline.config on edited copies of the shipped params.yaml, and of a stage refusing bad settings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Mapping, Tuple

import pytest
import yaml

from pipeline.config import Config, config_to_dict, read_settings
from pipeline.preflight import write_stage_settings
from pipeline.settings import load_settings
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"


def copy_params(folder: Path) -> Path:
    """Copy the shipped params.yaml, unchanged, into `folder`."""
    return Path(shutil.copy(PARAMS, folder / "params.yaml"))


def write_params(folder: Path, edits: Mapping[str, Any]) -> Path:
    """Copy the shipped params.yaml into `folder`, setting each dotted key of `edits` (new keys are added)."""
    settings = yaml.safe_load(PARAMS.read_text())
    for dotted, value in edits.items():
        *sections, key = dotted.split(".")
        node = settings
        for section in sections:
            node = node[section]
        node[key] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def write_params_text(folder: Path, old: str, new: str) -> Path:
    """Copy the shipped params.yaml into `folder` with one exact piece of its text replaced."""
    text = PARAMS.read_text()
    assert text.count(old) == 1, f"{old!r} should occur once in params.yaml"
    path = folder / "params.yaml"
    path.write_text(text.replace(old, new))
    return path


def config_error(path: Path, overrides: Tuple[str, ...] = ()) -> str:
    """The message of the ConfigError that loading `path` must raise."""
    with pytest.raises(ConfigError) as caught:
        load_settings(overrides, path=path)
    return str(caught.value)


def leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) for every value of a nested mapping that is not itself a non-empty mapping."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# --- the shipped settings -------------------------------------------------------------------------------------


def test_shipped_params_load_with_every_value_as_written(tmp_path: Path) -> None:
    config = load_settings(path=copy_params(tmp_path))

    shipped = dict(leaves(yaml.safe_load(PARAMS.read_text())))
    loaded = dict(leaves(config_to_dict(config)))
    assert {key: loaded.get(key, "<missing>") for key in shipped} == shipped


def test_layer_ratios_maps_the_layer_patterns_to_prune_ratio(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"prune.layers": ["layer2.*.conv1", "*conv2"], "prune.ratio": 0.4})

    assert load_settings(path=path).layer_ratios() == {"layer2.*.conv1": 0.4, "*conv2": 0.4}


def test_validate_refuses_a_zero_out_schedule_too_short_for_the_model(tmp_path: Path) -> None:
    """The reference's guard: stabilize_steps ≥ zero_out_interval × learnable layers (ResNet20: 19 convs + fc)."""
    from pipeline.preflight import check_runnable
    edits = {"model.name": "resnet20", "prune.reg.zero_out": True, "prune.reg.zero_out_interval": 10}
    check_runnable(load_settings(path=write_params(tmp_path, {**edits, "prune.reg.stabilize_steps": 200})))
    with pytest.raises(ConfigError, match=r"'prune.reg.stabilize_steps' \(199\).*20 learnable layers = 200"):
        check_runnable(load_settings(path=write_params(tmp_path, {**edits, "prune.reg.stabilize_steps": 199})))


def test_extra_ratios_come_after_the_layer_patterns_and_win(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"prune.ratios": {"layer3.*.conv1": 0.5, "*layer*.conv1": 0.3}})

    assert list(load_settings(path=path).layer_ratios().items()) == [("*layer*.conv1", 0.3), ("layer3.*.conv1", 0.5)]


def test_empty_layers_are_fine_when_ratios_name_the_layers(tmp_path: Path) -> None:
    path = write_params(tmp_path, {"prune.layers": [], "prune.ratios": {"layer1.*.conv1": 0.5}})

    assert load_settings(path=path).layer_ratios() == {"layer1.*.conv1": 0.5}


# --- unknown keys and wrong types --------------------------------------------------------------------------------


@pytest.mark.parametrize("key, suggestion", [
    ("sed", "seed"),
    ("pretrain.epoch", "pretrain.epochs"),
    ("prune.reg.alhpa", "prune.reg.alpha"),
], ids=["top-level", "in-a-section", "nested"])
def test_unknown_key_is_refused_with_its_full_name_and_the_close_match(tmp_path: Path, key: str,
                                                                       suggestion: str) -> None:
    message = config_error(write_params(tmp_path, {key: 1}))

    assert f"unknown key '{key}'" in message
    assert f"Did you mean '{suggestion}'?" in message


@pytest.mark.parametrize("key, value, expected", [
    ("pretrain.epochs", "ten", "int"),
    ("pretrain.epochs", 10.5, "int"),
    ("prune.layers", 5, "List[str]"),
    ("prune.ratio", "high", "float"),
    ("prune.ratios", [0.5], "mapping"),
    ("prune.reg", 5, "mapping"),
], ids=["epochs-word", "epochs-fraction", "layers-number", "ratio-word", "ratios-list", "section-number"])
def test_wrong_type_is_refused_naming_the_full_key(tmp_path: Path, key: str, value: Any, expected: str) -> None:
    message = config_error(write_params(tmp_path, {key: value}))

    assert f"'{key}'" in message
    assert expected in message


# --- values out of range and unknown names -------------------------------------------------------------------


@pytest.mark.parametrize("edits, key, explanation", [
    ({"prune.ratio": 1.0}, "prune.ratio", "must be in [0, 1)"),
    ({"prune.ratio": -0.1}, "prune.ratio", "must be in [0, 1)"),
    ({"prune.ratios": {"layer1.*": 1.2}}, "prune.ratios['layer1.*']", "must be in [0, 1)"),
    ({"pretrain.lr": 0}, "pretrain.lr", "must be greater than 0"),
    ({"retrain.weight_decay": -1e-4}, "retrain.weight_decay", "must be 0 or more"),
    ({"prune.momentum": 1.0}, "prune.momentum", "must be in [0, 1)"),
    ({"pretrain.milestones": [9, 6]}, "pretrain.milestones", "strictly increasing"),
    ({"retrain.milestones": [6, 12]}, "retrain.milestones", "at or past retrain.epochs=12"),
    ({"prune.batch_size": 0}, "prune.batch_size", "must be greater than 0"),
    ({"prune.reg.delta": 0}, "prune.reg.delta", "must be greater than 0"),
    ({"device": "gpu"}, "device", "use auto, cpu, cuda, cuda:N or mps"),
    ({"amp": "fp8"}, "amp", "is not one of auto, fp32, bf16, fp16"),
    ({"model.name": "resnet65"}, "model.name", "Did you mean 'resnet56'?"),
    ({"data.name": "cifar"}, "data.name", "Did you mean 'cifar10'?"),
    ({"prune.method": "tp"}, "prune.method", "Did you mean 'tpp'?"),
    ({"prune.layers": []}, "prune.layers", "is empty and prune.ratios too"),
    ({"trainability.jsv_samples": -1}, "trainability.jsv_samples", "must be 0 (off) or more"),
], ids=["ratio-1", "ratio-negative", "ratios-entry-1.2", "lr-0", "weight-decay-negative", "momentum-1",
        "milestones-decreasing", "milestone-at-epochs", "batch-size-0", "delta-0", "device-gpu", "amp-fp8",
        "model-typo", "dataset-typo", "method-typo", "no-layers", "jsv-samples-negative"])
def test_out_of_range_value_is_refused_naming_the_key_and_the_rule(tmp_path: Path, edits: Dict[str, Any], key: str,
                                                                   explanation: str) -> None:
    message = config_error(write_params(tmp_path, edits))

    assert f"'{key}'" in message
    assert explanation in message


def test_amp_values_survive_a_yaml_1_2_round_trip_as_dvc_exp_writes_it(tmp_path: Path) -> None:
    """`dvc exp run -S` rewrites params.yaml as YAML 1.2 (unquoted), which YAML 1.1 readers must read back alike."""
    for mode in ("fp32", "bf16", "fp16"):
        path = write_params_text(tmp_path, "amp: auto", f"amp: {mode}")
        assert yaml.safe_load(path.read_text())["amp"] == mode
    message = config_error(write_params_text(tmp_path, "amp: auto", "amp: off"))
    assert "'amp'" in message and "auto, fp32, bf16, fp16" in message


# --- Hydra-style overrides ------------------------------------------------------------------------------------


def test_override_replaces_the_value_from_params_yaml(tmp_path: Path) -> None:
    config = load_settings(["prune.ratio=0.7"], path=copy_params(tmp_path))

    assert config.prune.ratio == 0.7
    assert config.layer_ratios() == {"*layer*.conv1": 0.7}


def test_override_of_a_key_that_does_not_exist_is_a_config_error(tmp_path: Path) -> None:
    message = config_error(copy_params(tmp_path), ("prune.ratoi=0.7",))

    assert "'prune.ratoi'" in message
    assert "prune.ratio=0.7" in message


def test_override_with_an_out_of_range_value_is_checked_like_the_file(tmp_path: Path) -> None:
    message = config_error(copy_params(tmp_path), ("prune.ratio=1.5",))

    assert "'prune.ratio' 1.5 is not a pruning ratio" in message


# --- unreadable settings files --------------------------------------------------------------------------------


def test_missing_params_yaml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "params.yaml"

    assert f"{missing} does not exist" in config_error(missing)


@pytest.mark.parametrize("old, new", [
    ('layers: ["*layer*.conv1"]', 'layers: ["*layer*.conv1"'),
    ("  name: digits", "\tname: digits"),
], ids=["unclosed-bracket", "tab-indent"])
def test_malformed_yaml_is_a_config_error_pointing_at_the_line(tmp_path: Path, old: str, new: str) -> None:
    line = 1 + next(number for number, text in enumerate(PARAMS.read_text().splitlines()) if old in text)

    message = config_error(write_params_text(tmp_path, old, new))

    assert "params.yaml is not valid YAML" in message
    assert f"line {line}" in message


def test_unresolvable_interpolation_is_a_config_error(tmp_path: Path) -> None:
    message = config_error(write_params_text(tmp_path, "seed: 0", "seed: ${base_seed}"))

    assert "'base_seed' not found" in message


# --- a stage refusing bad settings ----------------------------------------------------------------------------


def test_stage_refuses_a_bad_override_with_one_paragraph_and_exit_2_before_any_work(tmp_path: Path) -> None:
    write_stage_settings(load_settings(path=copy_params(tmp_path)), tmp_path / "settings")

    result = subprocess.run([sys.executable, str(REPO / "stages" / "prune.py"), "prune.ratio=1.5"], cwd=tmp_path,
                            env={**os.environ, "DVC_ROOT": str(tmp_path)}, capture_output=True, text=True,
                            timeout=120)

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert "\n" not in output, f"expected one paragraph, got:\n{output}"
    assert output.startswith("error: params.yaml: 'prune.ratio' 1.5 is not a pruning ratio")
    assert sorted(os.listdir(tmp_path)) == ["params.yaml", "settings"]


@pytest.mark.parametrize("line, key", [("  lr: 0.01\n  momentum: 0.9\n  weight_decay: 5.0e-4\n  reg:", "prune.lr"),
                                       ("seed: 0\n", "seed")])
def test_a_missing_key_is_an_error_not_a_hidden_default(tmp_path: Path, line: str, key: str) -> None:
    replacement = line.replace("  lr: 0.01\n", "") if key == "prune.lr" else ""
    path = write_params_text(tmp_path, line, replacement)
    assert f"missing key '{key}'" in config_error(path)


def test_a_typo_in_a_section_name_is_named_as_such(tmp_path: Path) -> None:
    message = config_error(write_params_text(tmp_path, "\nretrain:\n", "\nretrian:\n"))
    assert "unknown key 'retrian'" in message and "Did you mean 'retrain'?" in message


def test_a_top_level_list_is_refused_before_hydra_sees_it(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- seed: 0\n- device: auto\n")
    message = config_error(path)
    assert "must be a mapping of sections" in message and "its top level is a list" in message
    assert "ListConfig" not in message


# --- one source of defaults -------------------------------------------------------------------------------------


def test_schema_defaults_are_the_shipped_params_yaml() -> None:
    """A library user building `Config()` / `PruneConfig()` gets the experiment a pipeline user gets from the shipped
    params.yaml: the schema's defaults are the truth and params.yaml writes every one of them out."""
    shipped = dict(leaves(read_settings(PARAMS)))
    defaults = dict(leaves(config_to_dict(Config())))
    drift = {key: (shipped.get(key, "<missing>"), defaults.get(key, "<missing>"))
             for key in shipped.keys() | defaults.keys() if shipped.get(key, "<missing>") != defaults.get(key, "<missing>")}
    assert not drift, (f"params.yaml and the defaults in pipeline/config/schema.py differ at {drift} (params.yaml value, "
                       f"schema default): change both together")
