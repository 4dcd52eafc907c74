"""Studies: a grid of real pruning runs on the embedded digits, its report, its cache and its refusals."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import yaml
from mlflow import MlflowClient

import pipeline.experiment as experiment
import pipeline.fingerprint as fingerprint
from pipeline.config import load_config
from pipeline.data import materialize_digits
from pipeline.errors import ConfigError
from pipeline.study.grid import load_study
from pipeline.study.runner import run_study
from pipeline.study.outputs import epoch_table, mean_std, table1

REPO = Path(__file__).resolve().parents[1]
TINY = {"model.name": "resnet20", "pretrain.epochs": 1, "pretrain.milestones": [], "prune.reg.delta": 0.5,
        "prune.reg.stabilize_steps": 2, "retrain.epochs": 2, "retrain.milestones": [],
        "trainability.jsv_samples": 4}
GRID = {"methods": {"TPP": {"prune.method": "tpp"}, "L1": {"prune.method": "l1"}}, "ratios": [0.5, 0.9],
        "retrain": {"fast": {"retrain.lr": 0.01}, "slow": {"retrain.lr": 0.001}}, "seeds": [0]}


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with the shipped params.yaml and the digits data; MLflow writes into it."""
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    materialize_digits(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path


def write_study(folder: Path, **changes: Any) -> Path:
    spec = {"name": "tiny", "description": "A tiny grid.", "base": "params.yaml", "settings": dict(TINY), **GRID,
            **changes}
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow  # computes a whole grid
def test_study_writes_the_table_figures_and_one_mlflow_run_per_cell(project: Path) -> None:
    output = run_study(write_study(project), project / "out", root=project)

    cells = (output / "cells.csv").read_text().splitlines()
    assert cells[0].startswith("method,ratio,schedule,seed,dense_acc,pruned_acc,best_acc,final_acc,jsv_dense")
    assert len(cells) == 1 + 2 * 2 * 2
    assert len((output / "curves.csv").read_text().splitlines()) == 1 + 8 * 2
    report = (output / "report.md").read_text()
    assert "| | PR 0.5 | PR 0.9 |" in report
    blocks = report.split("| *slow* |")
    assert "| TPP |" in blocks[0] and "| L1 |" in blocks[0] and "| TPP |" in blocks[1] and "| L1 |" in blocks[1]
    assert "| fast | TPP | 0.5 |" in report and "ep 0 | ep 1 | ep 2" in report
    for figure in ("accuracy_vs_ratio.png", "retrain_curves.png", "jsv_curves.png"):
        assert (output / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure})" in report

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    experiment_id = client.get_experiment_by_name("tpp-study-tiny").experiment_id
    runs = client.search_runs([experiment_id])
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    cell_runs = [run for run in runs if run.info.run_name != "report" and run not in parents]
    assert len(cell_runs) == 8
    cell = next(run for run in cell_runs if run.info.run_name == "TPP · ratio 0.9 · slow · seed 0")
    assert cell.data.params["study.schedule"] == "slow" and cell.data.params["retrain.lr"] == "0.001"
    assert len(client.get_metric_history(cell.info.run_id, "test_acc")) == 2
    assert len(client.get_metric_history(cell.info.run_id, "mean_jsv")) == 2


@pytest.mark.slow  # computes a grid, then a wider one
def test_rerun_reuses_every_cell_and_a_wider_grid_computes_only_what_is_new(project: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    run_study(write_study(project), project / "out", root=project)
    first = (project / "out" / "cells.csv").read_text()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the dense network was trained again")

    pruned_runs = []
    original_prune = experiment.prune
    monkeypatch.setattr(experiment, "pretrain", refuse)
    monkeypatch.setattr(experiment, "prune", lambda config, *rest, **kw: (pruned_runs.append(
        (config.prune.method, config.prune.ratio)), original_prune(config, *rest, **kw))[1])

    run_study(write_study(project), project / "out", root=project)
    assert (project / "out" / "cells.csv").read_text() == first and pruned_runs == []

    run_study(write_study(project, ratios=[0.5, 0.7, 0.9]), project / "out", root=project)
    assert sorted(pruned_runs) == [("l1", 0.7), ("tpp", 0.7)]
    assert len((project / "out" / "cells.csv").read_text().splitlines()) == 1 + 2 * 3 * 2


@pytest.mark.slow  # a grid computed twice
def test_an_unusable_cache_file_is_rebuilt_with_a_warning(project: Path) -> None:
    study = write_study(project, methods={"L1": {"prune.method": "l1"}}, ratios=[0.5],
                        retrain={"fast": {"retrain.lr": 0.01}})
    run_study(study, project / "out", root=project)
    first = (project / "out" / "cells.csv").read_text()
    cache = project / "out" / "cache"
    cell = next(cache.glob("cell-*.json"))
    cell.write_text('{"best_acc": 9')
    dense = next(cache.glob("dense-*.pt"))
    dense.write_bytes(b"not a checkpoint")
    next(cache.glob("pruned-*.pt")).unlink()

    with pytest.warns(UserWarning, match="is unusable and is computed again") as warned:
        run_study(study, project / "out", root=project)
    assert {str(warning.message).split(" is unusable")[0] for warning in warned} == {
        f"The study cache file {cell}", f"The study cache file {dense}"}
    assert (project / "out" / "cells.csv").read_text() == first
    assert torch.load(dense, weights_only=True)["format"] == "tpp-pipeline/checkpoint"
    assert json.loads(cell.read_text())["best_acc"] > 9


def test_renamed_rows_reuse_their_cells_under_the_new_names(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_study(write_study(project, methods={"L1": {"prune.method": "l1"}}, ratios=[0.5]), project / "out",
              root=project)
    monkeypatch.setattr(experiment, "retrain", lambda *args, **kwargs: pytest.fail("a cell was computed again"))
    output = run_study(write_study(project, methods={"L1 (Li et al.)": {"prune.method": "l1"}}, ratios=[0.5]),
                       project / "out", root=project)
    assert "| L1 (Li et al.) |" in (output / "report.md").read_text()


@pytest.mark.slow  # a study cell and a whole pipeline run
def test_a_study_cell_equals_the_pipeline_run_with_its_settings(project: Path) -> None:
    study = write_study(project, methods={"TPP": {"prune.method": "tpp"}}, ratios=[0.9],
                        retrain={"slow": {"retrain.lr": 0.001}}, seeds=[3])
    output = run_study(study, project / "out", root=project)
    cell = json.loads(next((output / "cache").glob("cell-*.json")).read_text())

    settings = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in {**TINY, "prune.ratio": 0.9, "retrain.lr": 0.001, "seed": 3}.items():
        *sections, leaf = dotted.split(".")
        node = settings
        for section in sections:
            node = node[section]
        node[leaf] = value
    (project / "params.yaml").write_text(yaml.safe_dump(settings))
    config = load_config(path=project / "params.yaml")
    for stage in ("pretrain", "prune", "retrain", "evaluate"):
        runpy.run_path(str(REPO / "stages" / f"{stage}.py"))["main"](config)
    pipeline = json.loads((project / "metrics" / "evaluate.json").read_text())

    assert (cell["dense_acc"], cell["pruned_acc"], cell["final_acc"], cell["best_acc"]) == (
        pipeline["dense_acc"], pipeline["pruned_acc"], pipeline["final_acc"], pipeline["best_retrain_acc"])
    for key in ("jsv_dense", "jsv_pruned", "jsv_final"):
        assert cell[key] == pytest.approx(pipeline[key], rel=1e-5)
    assert (cell["params_pruned"], cell["macs_pruned"]) == (pipeline["params_pruned"], pipeline["macs_pruned"])


@pytest.mark.parametrize("changes, expected", [
    ({"ratio": [0.5]}, "unknown key 'ratio'. Did you mean 'ratios'?"),
    ({"settings": {"retrain.learning_rate": 0.1}}, "the override 'retrain.learning_rate' names no setting"),
    ({"ratios": [0.5, 1.5]}, "cell 'TPP' at ratio 1.5, 'fast', seed 0: params.yaml: 'prune.ratio' 1.5"),
    ({"retrain": {"fast": {"retrain.lr": -1}}}, "'retrain.lr' -1.0 must be greater than 0"),
    ({"methods": {"TPP": {"prune.method": "tpq"}}}, "Did you mean 'tpp'?"),
    ({"methods": {}}, "'methods' must map row names to overrides"),
    ({"seeds": [0, 0]}, "'seeds' [0, 0] lists a value twice"),
    ({"base": "missing.yaml"}, "'base' names missing.yaml, which does not exist"),
    ({"methods": {"TPP": {"prune.method": "tpp", "device": "cpu"}, "L1": {"prune.method": "l1"}}},
     "the cells ask for different devices"),
], ids=["typo-key", "unknown-override", "ratio-out-of-range", "negative-lr", "method-typo", "no-methods",
        "repeated-seed", "missing-base", "mixed-devices"])
def test_bad_study_files_are_refused_before_any_work(project: Path, changes: Dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        run_study(write_study(project, **changes), project / "out", root=project)
    assert expected in str(caught.value)
    assert "tiny.yaml" in str(caught.value)
    assert not (project / "out").exists()


def test_shipped_studies_are_valid_and_cover_the_paper_comparisons() -> None:
    table = load_study(REPO / "studies" / "table1.yaml")
    assert {overrides["prune.method"] for overrides in table.methods.values()} == {
        "tpp", "greg", "l1", "l1_orthp", "random", "scratch"}
    assert [overrides["retrain.lr"] for overrides in table.retrain.values()] == [0.01, 0.001]
    assert len(table.seeds) >= 3
    trainability = load_study(REPO / "studies" / "trainability.yaml")
    assert trainability.settings["model.name"] == "mlp7_linear" and trainability.ratios == [0.8]
    assert [overrides["prune.method"] for overrides in trainability.methods.values()] == ["l1", "l1_orthp", "tpp"]
    ablation = load_study(REPO / "studies" / "ablation.yaml")
    assert {"prune.reg.decorrelation": False} in ablation.methods.values()


def result(method: str, ratio: float, schedule: str, seed: int, best: float) -> Dict[str, Any]:
    return {"method": method, "ratio": ratio, "schedule": schedule, "seed": seed, "best_acc": best,
            "dense_acc": 95.0 + seed, "pruned_acc": 10.0, "params_dense": 100, "params_pruned": 50,
            "macs_dense": 400, "macs_pruned": 100,
            "history": [{"epoch": 1, "test_acc": best - 1}, {"epoch": 2, "test_acc": best}]}


def test_table1_layout_shows_mean_and_std_over_seeds_and_the_best_in_bold() -> None:
    results = [result(method, ratio, "LR 1e-2", seed, best)
               for method, ratio, seed, best in [("TPP", 0.5, 0, 90), ("TPP", 0.5, 1, 92), ("TPP", 0.9, 0, 80),
                                                 ("TPP", 0.9, 1, 80), ("L1", 0.5, 0, 93), ("L1", 0.5, 1, 93),
                                                 ("L1", 0.9, 0, 70), ("L1", 0.9, 1, 74)]]
    assert table1(results) == [
        "| | PR 0.5 | PR 0.9 |", "|---|---|---|",
        "| sparsity / speed-up (MACs) | 50.0% / 4.00× | 50.0% / 4.00× |",
        "| dense | 95.50 ± 0.71 | 95.50 ± 0.71 |",
        "| *LR 1e-2* | | |",
        "| TPP | 91.00 ± 1.41 | **80.00 ± 0.00** |",
        "| L1 | **93.00 ± 0.00** | 72.00 ± 2.83 |"]
    assert epoch_table(results)[2:] == ["| LR 1e-2 | TPP | 10.00 | 79.00 | 80.00 |",
                                        "| LR 1e-2 | L1 | 10.00 | 71.00 | 72.00 |"]
    assert mean_std([3.0]) == (3.0, 0.0)


def test_command_line_reports_a_bad_study_in_one_paragraph(tmp_path: Path) -> None:
    completed = subprocess.run([sys.executable, "-m", "pipeline.study", str(tmp_path / "nope.yaml")],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    assert completed.returncode == 2
    assert "study file" in completed.stderr and "does not exist" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_the_cache_key_ignores_presentation_code_but_not_computing_code(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    """Editing a study's report layout keeps hours of cached cells; editing what computes them discards them."""
    code = tmp_path / "pipeline"
    shutil.copytree(REPO / "pipeline", code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "CODE_FOLDER", code)
    original = fingerprint.code_fingerprint()
    for presentation in fingerprint.PRESENTATION_MODULES:
        assert (code / presentation).is_file(), presentation
        with open(code / presentation, "a") as handle:
            handle.write("# a layout edit\n")
    assert fingerprint.code_fingerprint() == original
    with open(code / "study" / "runner.py", "a") as handle:
        handle.write("# a computing edit\n")
    assert fingerprint.code_fingerprint() != original
