"""The whole product, end to end: real `dvc repro` / `dvc exp` on a tiny config in a temporary copy of the repo,
real MLflow store and server. Tests in this module run in order and share one repository copy."""

import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests
import torch
from mlflow import MlflowClient

from pipeline.checkpoint import load_checkpoint
from pipeline.data import build_loaders
from pipeline.models import create_model
from pipeline.pruning.surgery import remove_filters
from pipeline.training.loop import evaluate
from pipeline.preflight import resolved_settings
from pipeline.settings import load_settings
from pipeline.tracking import DRAIN_TIMEOUT_S, OPEN_TIMEOUT_S
from tiny_repo import TINY, VENV_BIN, make_repo, run, set_params, stages_ran

# Slow (minutes): whole `dvc repro` runs of the pipeline, reruns after edits and tracking servers.
# `make test-slow` and CI run them.
pytestmark = pytest.mark.slow

STAGES = ("pretrain", "prune", "retrain", "evaluate")
# The tiny experiment with a dense network worth pruning (about 94 % on digits, chance is 10 %) and a stabilize phase
# long enough for TPP's penalties to take the pruned filters near zero: 4 + 30 steps of the default TPP settings.
CLAIM = {**TINY, "pretrain.epochs": 5, "pretrain.lr": 0.05, "pretrain.milestones": [4],
         "prune.reg.stabilize_steps": 30}
# Accuracy (percentage points) TPP may lose when the filters it drove to zero are removed: 7 of the 360 test images.
REMOVAL_MARGIN = 2.0
OUTPUTS = ("models", "metrics", "plots", "reports", "settings", "dvc.lock")


def output_hashes(repo: Path) -> dict:
    """Content hash of every pipeline output (and dvc.lock), to tell whether a command touched any."""
    files = [path for name in OUTPUTS for path in sorted((repo / name).rglob("*") if (repo / name).is_dir()
                                                          else [repo / name]) if path.is_file()]
    return {str(path.relative_to(repo)): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A git + DVC copy of the project with the embedded data materialised and a tiny experiment."""
    return make_repo(tmp_path_factory.mktemp("project"), CLAIM)


def test_full_pipeline_runs_and_tracks_every_stage(repo):
    _, output = run(["dvc", "repro"], repo, TPP_PIPELINE_RUN="first")
    assert stages_ran(output) == {"validate", *STAGES}
    assert output.index("Running stage 'validate'") < output.index("Running stage 'pretrain'")
    expected = resolved_settings(load_settings(path=repo / "params.yaml"))
    assert {stage: (repo / "settings" / f"{stage}.json").read_text() for stage in STAGES} == expected
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    for key in ("dense_acc", "pruned_acc", "final_acc", "params_dense", "params_pruned", "macs_dense", "macs_pruned",
                "sparsity", "speedup_macs", "jsv_dense", "jsv_pruned", "jsv_final"):
        assert key in metrics
    assert metrics["params_pruned"] < metrics["params_dense"] and metrics["speedup_macs"] > 1
    prune = json.loads((repo / "metrics/prune.json").read_text())
    assert prune["acc_before_removal"] > 80, prune
    assert prune["acc_after_pruning"] >= prune["acc_before_removal"] - REMOVAL_MARGIN, prune
    assert metrics["pruned_acc"] == pytest.approx(prune["acc_after_pruning"])
    assert metrics["final_acc"] > 80 and metrics["dense_acc"] > 80
    summary = json.loads((repo / "metrics/summary.json").read_text())
    assert {key: summary[key] for key in ("dense_acc", "pruned_acc", "final_acc")} == \
        {key: metrics[key] for key in ("dense_acc", "pruned_acc", "final_acc")}
    for path in ("models/dense.pt", "models/pruned.pt", "models/final.pt", "reports/accuracy.png",
                 "reports/report.md", "plots/pretrain.csv", "plots/retrain.csv", "dvc.lock"):
        assert (repo / path).is_file(), path
    assert (repo / "reports/accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    retrain_curve = (repo / "plots/retrain.csv").read_text().splitlines()
    assert retrain_curve[0].endswith(",test_acc,mean_jsv") and len(retrain_curve) == 3
    assert float(retrain_curve[-1].split(",")[-1]) == pytest.approx(metrics["jsv_final"], rel=1e-5)
    assert "mean Jacobian singular value" in (repo / "reports/report.md").read_text()
    epochs = CLAIM["pretrain.epochs"]
    assert re.search(rf"\[pretrain\] epoch {epochs}/{epochs} .* test_acc [\d.]+%", output)
    assert "Traceback" not in output

    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name("tpp-pipeline").experiment_id)
    parents = [r for r in runs if r.data.tags.get("tpp.pipeline_key") == "first"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(STAGES)
    assert len(client.get_metric_history(children["pretrain"].info.run_id, "test_acc")) == epochs
    assert children["prune"].data.params["prune.ratio"] == "0.5"
    assert "checkpoint.final.sha256" in children["retrain"].data.tags
    assert children["evaluate"].data.metrics["final_acc"] == pytest.approx(metrics["final_acc"])
    assert not {"acc_dense", "acc_pruned", "acc_final"} & set(children["evaluate"].data.metrics)


def test_tpp_keeps_far_more_accuracy_through_removal_than_l1(repo):
    """TPP's claim: the same filters removed in one shot from the dense network (L1, what TPP is compared with)
    lose far more accuracy than after TPP's penalties moved the network's function onto the kept filters."""
    config = load_settings(path=repo / "params.yaml")
    _, test, _ = build_loaders(replace(config.data, root=str(repo / "data")), batch_size=256, seed=config.seed,
                               device=torch.device("cpu"))
    dense = load_checkpoint(repo / "models/dense.pt")
    selection = load_checkpoint(repo / "models/pruned.pt").pruned
    l1 = remove_filters(dense.model, selection, dense.architecture.example_inputs(torch.device("cpu")))
    l1_acc = evaluate(l1, test, torch.device("cpu"))[1]
    tpp_acc = json.loads((repo / "metrics/prune.json").read_text())["acc_after_pruning"]
    assert tpp_acc >= l1_acc + 30, (tpp_acc, l1_acc)


def test_second_repro_does_nothing(repo):
    started = time.perf_counter()
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == set()
    assert "Data and pipelines are up to date" in output
    assert time.perf_counter() - started < 60


def test_retrain_lr_reruns_only_retrain_and_evaluate(repo):
    set_params(repo, {"retrain.lr": 0.005})
    _, changed = run(["dvc", "params", "diff"], repo)
    assert "retrain.lr" in changed and "0.005" in changed
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == {"validate", "retrain", "evaluate"}


def test_run_only_setting_reruns_no_stage(repo):
    set_params(repo, {"trainer.checkpoint_every": 7})
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == {"validate"}


def test_worker_count_reruns_no_stage(repo):
    """Results do not depend on `data.num_workers` (tests/test_data.py): changing it reruns nothing."""
    set_params(repo, {"data.num_workers": 3})
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == {"validate"}
    _, status = run(["dvc", "status"], repo)
    assert "Data and pipelines are up to date" in status


def test_prune_ratio_reruns_prune_retrain_and_evaluate(repo):
    set_params(repo, {"prune.ratio": 0.7})
    _, output = run(["dvc", "repro"], repo)
    assert stages_ran(output) == {"validate", "prune", "retrain", "evaluate"}
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "ratio 0.7"], repo)


def test_bad_setting_stops_dvc_with_one_clear_message_and_removes_nothing(repo):
    before = output_hashes(repo)
    set_params(repo, {"retrain.lr": -1.0})
    code, output = run(["dvc", "repro"], repo, check=False)
    set_params(repo, {"retrain.lr": 0.005})
    assert code != 0
    assert "'retrain.lr' -1.0 must be greater than 0" in output
    assert "Traceback" not in output
    assert stages_ran(output) == {"validate"}
    assert output_hashes(repo) == before


def test_dvc_experiments_show_key_metrics(repo):
    run(["dvc", "exp", "run", "-S", "prune.ratio=0.3", "-n", "ratio03"], repo)
    _, shown = run(["dvc", "exp", "show", "--json"], repo)
    experiments = json.loads(shown)
    names = {exp.get("name") for baseline in experiments for exp in (baseline.get("experiments") or [])}
    assert "ratio03" in names
    _, table = run(["dvc", "exp", "show", "--md", "--only-changed"], repo)
    assert "speedup_macs" in table and "params_pruned" in table and "prune.ratio" in table


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


def hold_connections(listener: socket.socket) -> None:
    """Accept every connection and never answer, until the listener closes."""
    held = []
    while True:
        try:
            held.append(listener.accept()[0])
        except OSError:
            return


def test_tracking_server_that_never_answers_delays_a_stage_boundedly(repo):
    """The 1,237 s case: a server that accepts connections and never answers."""
    metrics_path = repo / "metrics/evaluate.json"
    started = time.perf_counter()
    run([sys.executable, "stages/evaluate.py"], repo)
    baseline = time.perf_counter() - started
    listener = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=hold_connections, args=(listener,), daemon=True).start()
    metrics_path.unlink()
    try:
        started = time.perf_counter()
        _, output = run([sys.executable, "stages/evaluate.py"], repo,
                        MLFLOW_TRACKING_URI=f"http://127.0.0.1:{listener.getsockname()[1]}")
        hanging = time.perf_counter() - started
    finally:
        listener.close()
    assert output.count("MLflow tracking is off") == 1
    assert "final_acc" in json.loads(metrics_path.read_text())
    assert hanging - baseline < OPEN_TIMEOUT_S + DRAIN_TIMEOUT_S + 30, (baseline, hanging)


def test_unwritable_mlflow_store_warns_once_and_keeps_dvc_metrics(repo):
    blocker = repo / "not_a_folder"
    blocker.write_text("a file where the store's folder should be")
    metrics_path = repo / "metrics/retrain.json"
    metrics_path.unlink()
    _, output = run([sys.executable, "stages/retrain.py"], repo,
                    MLFLOW_TRACKING_URI=f"sqlite:///{blocker}/mlflow.db")
    assert output.count("MLflow tracking is off") == 1
    assert "final_test_acc" in json.loads(metrics_path.read_text())


def test_a_starting_checkpoint_under_data_reruns_pretraining_when_replaced(repo):
    """model.checkpoint inside data/ is seen by DVC: replacing the file reruns pretraining, keeping it does not."""
    weights = repo / "data" / "weights" / "start.pth"
    weights.parent.mkdir()

    def write_weights(seed: int) -> None:
        torch.manual_seed(seed)
        torch.save(create_model("resnet20", 10, in_channels=1, image_size=8, shortcut="A").state_dict(), weights)

    def dense_hash() -> str:
        return hashlib.sha256((repo / "models/dense.pt").read_bytes()).hexdigest()

    write_weights(0)
    set_params(repo, {"model.checkpoint": "data/weights/start.pth"})
    _, output = run(["dvc", "repro"], repo)
    assert "pretrain" in stages_ran(output)
    first = dense_hash()
    _, output = run(["dvc", "repro"], repo)
    assert "pretrain" not in stages_ran(output)
    write_weights(1)
    _, output = run(["dvc", "repro"], repo)
    assert "pretrain" in stages_ran(output)
    assert dense_hash() != first
