"""The whole product, end to end: real `dvc repro` / `dvc exp` on a tiny config in a temporary copy of the repo,
real MLflow store and server. Tests in this module run in order and share one repository copy."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TRACKED = ["pipeline", "stages", ".dvc/config", ".dvcignore", ".gitignore", "dvc.yaml", "params.yaml", "data.dvc",
           "pyproject.toml"]
TINY = {"model.name": "resnet20", "pretrain.epochs": 2, "pretrain.milestones": [1], "prune.reg.delta": 0.25,
        "prune.reg.stabilize_steps": 6, "prune.ratio": 0.5, "retrain.epochs": 2, "retrain.milestones": [1],
        "evaluate.latency_repeats": 2, "evaluate.latency_batch_size": 16, "trainability.jsv_samples": 8}
STAGES = ("pretrain", "prune", "retrain", "evaluate")


def run(command, cwd, check=True, **env):
    """Run a command like a user would, with the virtual environment first on PATH."""
    environment = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
                   "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                   "GIT_COMMITTER_EMAIL": "t@t", **env}
    environment.pop("MLFLOW_TRACKING_URI", None) if "MLFLOW_TRACKING_URI" not in env else None
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}):\n{output[-4000:]}")
    return result.returncode, output


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        section = params
        for key in parents:
            section = section[key]
        section[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def stages_ran(output: str) -> set:
    return set(re.findall(r"Running stage '(\w+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of the project with the embedded data materialised and a tiny experiment."""
    root = tmp_path_factory.mktemp("project")
    for name in TRACKED:
        source = REPO / name
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    run([sys.executable, "-m", "pipeline.data", "digits", "--root", "data"], root)
    set_params(root, TINY)
    run(["git", "init", "-q"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "tiny experiment"], root)
    return root


def test_full_pipeline_runs_and_tracks_every_stage(repo):
    _, output = run(["dvc", "repro"], repo, TPP_PIPELINE_RUN="first")
    assert stages_ran(output) == set(STAGES)
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for key in ("dense_acc", "pruned_acc", "final_acc", "params_dense", "params_pruned", "macs_dense", "macs_pruned",
                "sparsity", "speedup_macs", "speedup_latency", "jsv_dense", "jsv_pruned", "jsv_final"):
        assert key in metrics
    assert metrics["params_pruned"] < metrics["params_dense"] and metrics["speedup_macs"] > 1
    assert 0 <= metrics["final_acc"] <= 100
    for path in ("models/dense.pt", "models/pruned.pt", "models/final.pt", "reports/accuracy.png",
                 "reports/report.md", "plots/pretrain.csv", "plots/retrain.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    assert (repo / "reports/accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    retrain_curve = (repo / "plots/retrain.csv").read_text().splitlines()
    assert retrain_curve[0].endswith(",test_acc,mean_jsv") and len(retrain_curve) == 3
    assert float(retrain_curve[-1].split(",")[-1]) == pytest.approx(metrics["jsv_final"], rel=1e-5)
    assert "mean Jacobian singular value" in (repo / "reports/report.md").read_text()
    assert re.search(r"\[pretrain\] epoch 2/2 .* test_acc [\d.]+%", output)
    assert "Traceback" not in output

    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name("tpp-pipeline").experiment_id)
    parents = [r for r in runs if r.data.tags.get("tpp.pipeline_key") == "first"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(STAGES)
    assert len(client.get_metric_history(children["pretrain"].info.run_id, "test_acc")) == 2
    assert children["prune"].data.params["prune.ratio"] == "0.5"
    assert "checkpoint.final.sha256" in children["retrain"].data.tags
    assert children["evaluate"].data.metrics["final_acc"] == pytest.approx(metrics["final_acc"])


def test_second_repro_does_nothing(repo):
    started = time.perf_counter()
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == set()
    assert "Data and pipelines are up to date" in output
    assert time.perf_counter() - started < 60


def test_retrain_lr_reruns_only_retrain_and_evaluate(repo):
    set_params(repo, {"retrain.lr": 0.005})
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == {"retrain", "evaluate"}


def test_prune_ratio_reruns_prune_retrain_and_evaluate(repo):
    set_params(repo, {"prune.ratio": 0.7})
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == {"prune", "retrain", "evaluate"}
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "ratio 0.7"], repo)


def test_bad_setting_stops_dvc_with_one_clear_message(repo):
    lock_before = (repo / "dvc.lock").read_text()
    dense_before = (repo / "models/dense.pt").read_bytes()
    set_params(repo, {"retrain.lr": -1.0})
    code, output = run(["dvc", "repro"], repo, check=False)
    set_params(repo, {"retrain.lr": 0.005})
    assert code != 0
    assert "'retrain.lr' -1.0 must be greater than 0" in output
    assert "Traceback" not in output
    assert (repo / "dvc.lock").read_text() == lock_before
    assert (repo / "models/dense.pt").read_bytes() == dense_before


def test_dvc_experiments_show_key_metrics(repo):
    run(["dvc", "exp", "run", "-S", "prune.ratio=0.3", "-n", "ratio03"], repo)
    _, shown = run(["dvc", "exp", "show", "--json"], repo)
    experiments = json.loads(shown)
    names = {exp.get("name") for baseline in experiments for exp in (baseline.get("experiments") or [])}
    assert "ratio03" in names
    _, table = run(["dvc", "exp", "show", "--md", "--only-changed"], repo)
    assert "final_acc" in table and "speedup_macs" in table and "prune.ratio" in table


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_stage_run_is_visible_through_the_mlflow_server(repo, tmp_path):
    port = free_port()
    server = subprocess.Popen([str(VENV_BIN / "mlflow"), "server", "--backend-store-uri",
                               f"sqlite:///{tmp_path}/server.db", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        run([sys.executable, "stages/evaluate.py"], repo, MLFLOW_TRACKING_URI=base, TPP_PIPELINE_RUN="served")
        experiment = requests.get(f"{base}/api/2.0/mlflow/experiments/get-by-name",
                                  params={"experiment_name": "tpp-pipeline"}, timeout=10).json()["experiment"]
        found = requests.post(f"{base}/api/2.0/mlflow/runs/search", timeout=10, json={
            "experiment_ids": [experiment["experiment_id"]],
            "filter": "tags.`mlflow.runName` = 'evaluate'"}).json()["runs"]
        assert len(found) == 1
        metrics = {m["key"]: m["value"] for m in found[0]["data"]["metrics"]}
        expected = json.loads((repo / "metrics/evaluate.json").read_text())
        assert metrics["final_acc"] == pytest.approx(expected["final_acc"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_unwritable_mlflow_store_warns_once_and_keeps_dvc_metrics(repo):
    blocker = repo / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    metrics_path = repo / "metrics/retrain.json"
    metrics_path.unlink()
    _, output = run([sys.executable, "stages/retrain.py"], repo,
                    MLFLOW_TRACKING_URI=f"sqlite:///{blocker}/mlflow.db")
    assert output.count("MLflow tracking is off") == 1
    assert "final_test_acc" in json.loads(metrics_path.read_text())
