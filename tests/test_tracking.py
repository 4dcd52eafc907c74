"""MLflow tracking against real stores: a SQLite file per test and one real `mlflow server`."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

import pytest
import requests
from mlflow import MlflowClient
from mlflow.entities import Run

from pipeline.tracking import (DRAIN_TIMEOUT_S, OPEN_TIMEOUT_S, PIPELINE_KEY_TAG, STAGE_TAG, TrackingWarning,
                               pipeline_key, track_stage, tracking_root, tracking_uri)

SERVER_START_TIMEOUT_S = 60.0
PARAMS = {"seed": 0, "prune": {"ratio": 0.9, "reg": {"alpha": 1000.0}, "ratios": {"*layer*.conv1": 0.5}},
          "model": {"name": "resnet20", "options": {}}}


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository root as DVC announces it, with no tracking settings inherited from the shell."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("TPP_PIPELINE_RUN", "run-a")
    return tmp_path


def local_client(root: Path) -> MlflowClient:
    """A client on the store the tracker uses by default, to check what it wrote."""
    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def stage_runs(client: MlflowClient) -> dict[str, Run]:
    """Every stage run of the experiment by stage name."""
    experiment = client.get_experiment_by_name("tpp-pipeline")
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STAGE_TAG}` != ''")
    return {run.data.tags[STAGE_TAG]: run for run in runs}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_stages_nest_under_one_parent_per_pipeline(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = repo / "model.pt"
    checkpoint.write_bytes(b"weights")
    with track_stage("prune", params=PARAMS) as tracker:
        for epoch in (1, 2, 3):
            tracker.log_metrics({"test_acc": 0.5 + epoch / 10, "train_loss": 1 / epoch}, step=epoch)
        tracker.set_tags({"device": "cpu"})
        tracker.log_artifact(checkpoint)
    client = local_client(repo)
    parent_id = stage_runs(client)["prune"].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "RUNNING"

    with track_stage("evaluate", close_pipeline=True) as tracker:
        tracker.log_metrics({"test_acc": 0.9})

    runs = stage_runs(client)
    assert {run.data.tags["mlflow.parentRunId"] for run in runs.values()} == {parent_id}
    assert {run.info.run_name: run.info.status for run in runs.values()} == {"prune": "FINISHED",
                                                                             "evaluate": "FINISHED"}
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "resnet20 0.9", "named by the settings that define it"
    assert parent.data.tags[PIPELINE_KEY_TAG] == "run-a"
    kind = client.get_experiment_by_name("tpp-pipeline").tags["mlflow.experimentKind"]
    assert kind == "custom_model_development", "MLflow's UI opens a model-training experiment on its runs table"
    prune = runs["prune"]
    assert prune.data.params["prune.reg.alpha"] == "1000.0"
    assert prune.data.params["prune.ratios._layer_.conv1"] == "0.5"
    assert prune.data.params["model.options"] == "{}"
    assert prune.data.tags["device"] == "cpu"
    history = client.get_metric_history(prune.info.run_id, "test_acc")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert (repo / "mlartifacts").is_dir()
    assert [a.path for a in client.list_artifacts(prune.info.run_id)] == ["model.pt"]

    with track_stage("pretrain") as tracker:
        after_close = tracker.parent_run_id
    monkeypatch.setenv("TPP_PIPELINE_RUN", "run-b")
    with track_stage("pretrain") as tracker:
        other_pipeline = tracker.parent_run_id
    assert len({parent_id, after_close, other_pipeline}) == 3


def test_an_experiment_made_before_the_kind_tag_gets_it_and_a_kind_the_user_chose_stays(repo: Path) -> None:
    client = local_client(repo)
    older = client.create_experiment("tpp-pipeline")
    chosen = client.create_experiment("mine", tags={"mlflow.experimentKind": "finetuning"})
    with track_stage("prune"):
        pass
    with mock.patch.dict(os.environ, {"MLFLOW_EXPERIMENT_NAME": "mine"}), track_stage("prune"):
        pass

    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "finetuning"


def test_pipeline_key_prefers_explicit_then_dvc_experiment_then_process_group(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TPP_PIPELINE_RUN", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert pipeline_key() == f"{socket.gethostname()}:{os.getpgid(0)}"
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-oaks")
    assert pipeline_key() == "brisk-oaks"
    monkeypatch.setenv("TPP_PIPELINE_RUN", "sweep-1")
    assert pipeline_key() == "sweep-1"


def test_queued_dvc_experiment_tracks_into_the_outer_repository(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temporary_copy = repo / ".dvc" / "tmp" / "exps" / "xyz"
    temporary_copy.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(temporary_copy))
    assert tracking_root() == repo
    assert tracking_uri(tracking_root()) == f"sqlite:///{repo / 'mlflow.db'}"

    with track_stage("pretrain", close_pipeline=True):
        pass

    assert not (temporary_copy / "mlflow.db").exists()
    assert stage_runs(local_client(repo))["pretrain"].info.status == "FINISHED"


def _directory_in_place_of_the_db(tmp_path: Path) -> str:
    """What SQLite reports for an unreadable or unwritable location: the file cannot be opened."""
    (tmp_path / "mlflow.db").mkdir()
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _corrupt_db(tmp_path: Path) -> str:
    (tmp_path / "mlflow.db").write_bytes(b"this is not a SQLite database" * 100)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _server_down(tmp_path: Path) -> str:
    return f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("broken_store", [_directory_in_place_of_the_db, _corrupt_db, _server_down],
                         ids=["directory-in-place-of-db", "corrupt-db", "server-down"])
def test_unusable_store_warns_once_and_the_stage_completes(repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                           broken_store: Callable[[Path], str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", broken_store(repo))
    artifact = repo / "metrics.json"
    artifact.write_text("{}")
    epochs_done = 0
    with pytest.warns(TrackingWarning) as caught:
        with track_stage("retrain", params=PARAMS, close_pipeline=True) as tracker:
            for epoch in (1, 2, 3):
                tracker.log_metrics({"test_acc": 0.5}, step=epoch)
                epochs_done = epoch
            tracker.set_tags({"device": "cpu"})
            tracker.log_artifact(artifact)

    assert epochs_done == 3
    [warning] = [w for w in caught if w.category is TrackingWarning]
    assert "DVC outputs and metrics are unaffected" in str(warning.message)
    assert tracker.run_id is None


def test_store_failing_mid_stage_warns_once(repo: Path) -> None:
    with pytest.warns(TrackingWarning) as caught:
        with track_stage("prune", params={"prune": {"ratio": 0.9}}) as tracker:
            tracker.log_params({"prune": {"ratio": 0.5}})
            tracker.log_metrics({"test_acc": 0.5}, step=1)

    [warning] = [w for w in caught if w.category is TrackingWarning]
    assert "could not log params" in str(warning.message)


@contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` remounted read-only for the duration: chmod does not stop root, a read-only mount does."""
    result = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here ({result.stderr.strip()})")
    try:
        for _ in range(50):   # "busy" while SQLite holds the file open for writing: wait for it to let go
            result = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True)
            if result.returncode == 0:
                break
            time.sleep(0.1)
        else:
            pytest.skip(f"cannot remount read-only here ({result.stderr.strip()})")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("break_store", ["delete", "read-only"])
def test_store_deleted_or_made_read_only_during_a_stage_is_one_warning_not_a_traceback(
        repo: Path, break_store: str, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    store = repo / "store"
    store.mkdir()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    try:
        with pytest.warns(TrackingWarning) as caught, contextlib.ExitStack() as broken:
            with track_stage("prune", params=PARAMS) as tracker:
                if break_store == "delete":
                    (store / "mlflow.db").unlink()
                else:
                    broken.enter_context(_read_only(store))
                for epoch in (1, 2, 3):
                    tracker.log_metrics({"test_acc": 0.5}, step=epoch)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]

    [warning] = [w for w in caught if w.category is TrackingWarning]
    assert "(OperationalError: " in str(warning.message), "the store's own reason, not MLflow's wrapper"
    assert "Traceback" not in capfd.readouterr().err
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


def test_exception_in_stage_fails_its_run_and_the_pipeline_and_propagates(repo: Path) -> None:
    with pytest.raises(RuntimeError, match="loss became NaN"):
        with track_stage("retrain", close_pipeline=True) as tracker:
            tracker.log_metrics({"train_loss": 2.3}, step=1)
            raise RuntimeError("loss became NaN")

    client = local_client(repo)
    run = stage_runs(client)["retrain"]
    assert run.info.status == "FAILED"
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on a free local port, shared by this module's tests, always stopped (with its
    workers) afterwards."""
    tmp_path = tmp_path_factory.mktemp("server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        server = subprocess.Popen(command, cwd=tmp_path, stdout=output, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        _wait_until_healthy(server, url, log)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _wait_until_healthy(server: subprocess.Popen, url: str, log: Path) -> None:
    """Poll /health within a bounded time; a server that exits or hangs fails the test with its log."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    pytest.fail(f"mlflow server at {url} did not answer /health within {SERVER_START_TIMEOUT_S:.0f} s")


def test_stage_tracks_to_a_real_server(repo: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    artifact = repo / "report.json"
    artifact.write_text("{}")
    with track_stage("retrain", params=PARAMS, close_pipeline=True) as tracker:
        for epoch in (1, 2, 3):
            tracker.log_metrics({"test_acc": epoch / 10}, step=epoch)
        tracker.log_artifact(artifact)

    api = f"{mlflow_server}/api/2.0/mlflow"
    experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "tpp-pipeline"},
                              timeout=10).json()["experiment"]
    tags = {tag["key"]: tag["value"] for tag in experiment["tags"]}
    assert tags["mlflow.experimentKind"] == "custom_model_development", "the UI opens on the runs table"
    found = requests.post(f"{api}/runs/search", timeout=10, json={
        "experiment_ids": [experiment["experiment_id"]], "filter": f"tags.`{STAGE_TAG}` = 'retrain'"}).json()
    [run] = found["runs"]
    assert run["info"]["status"] == "FINISHED"
    params = {param["key"]: param["value"] for param in run["data"]["params"]}
    assert params["prune.reg.alpha"] == "1000.0"
    history = requests.get(f"{api}/metrics/get-history", timeout=10,
                           params={"run_id": run["info"]["run_id"], "metric_key": "test_acc"}).json()["metrics"]
    assert [(m["step"], m["value"]) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    artifacts = requests.get(f"{api}/artifacts/list", params={"run_id": run["info"]["run_id"]}, timeout=10).json()
    assert [entry["path"] for entry in artifacts["files"]] == ["report.json"]
    parent_id = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}["mlflow.parentRunId"]
    parent = requests.get(f"{api}/runs/get", params={"run_id": parent_id}, timeout=10).json()["run"]
    assert parent["info"]["status"] == "FINISHED"


def _log_like_a_stage(epochs: int = 3) -> tuple[float, int]:
    """What a stage sends (params, per-epoch metrics, tags, an artifact, the end of its and the pipeline's runs),
    around no work of its own: returns the seconds tracking added and the epochs the stage got through."""
    artifact = Path(os.environ["DVC_ROOT"]) / "report.md"
    artifact.write_text("# report")
    done = 0
    started = time.perf_counter()
    with track_stage("evaluate", params=PARAMS, close_pipeline=True) as tracker:
        for epoch in range(1, epochs + 1):
            tracker.log_metrics({"test_acc": epoch / 10}, step=epoch)
            done = epoch
        tracker.set_tags({"device": "cpu"})
        tracker.log_artifact(artifact)
    return time.perf_counter() - started, done


@contextmanager
def tcp_server(handle: Callable[[socket.socket], None]) -> Iterator[str]:
    """A local TCP server whose every connection is handled by `handle` on its own thread; its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            threading.Thread(target=handle, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()
        for connection in connections:
            connection.close()


def _never_answer(connection: socket.socket) -> None:
    """Accept the request and say nothing, ever (the 1,237 s case)."""


def _trickle(connection: socket.socket) -> None:
    """Read the request, then send a response one byte every half second, never finishing it: no read timeout
    ever fires."""
    with closing(connection):
        try:
            connection.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" * 1000:
                connection.sendall(bytes([byte]))
                time.sleep(0.5)
        except OSError:
            return


@pytest.mark.parametrize("handle", [_never_answer, _trickle], ids=["accepts-never-answers", "answers-a-byte-at-a-time"])
def test_hanging_server_adds_bounded_time_and_one_warning(repo: Path, monkeypatch: pytest.MonkeyPatch,
                                                          handle: Callable[[socket.socket], None]) -> None:
    with tcp_server(handle) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        with pytest.warns(TrackingWarning) as caught:
            added, epochs = _log_like_a_stage()

    assert epochs == 3
    [warning] = [w for w in caught if w.category is TrackingWarning]
    assert "could not open the stage's run" in str(warning.message)
    assert OPEN_TIMEOUT_S <= added < OPEN_TIMEOUT_S + 5


def _delaying_proxy(upstream: str, delay_s: float) -> Callable[[socket.socket], None]:
    """A connection handler that forwards to `upstream`, holding every request `delay_s` seconds: a server that
    works but answers slowly."""
    host, port = upstream.removeprefix("http://").split(":")

    def handle(client: socket.socket) -> None:
        try:
            server = socket.create_connection((host, int(port)))
        except OSError:
            client.close()
            return
        with closing(client), closing(server):
            def answers() -> None:
                try:
                    while data := server.recv(65536):
                        client.sendall(data)
                except OSError:
                    return
            threading.Thread(target=answers, daemon=True).start()
            try:
                while data := client.recv(65536):
                    time.sleep(delay_s)
                    server.sendall(data)
            except OSError:
                return
    return handle


def test_slow_server_adds_bounded_time_and_at_most_one_warning(repo: Path, mlflow_server: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with tcp_server(_delaying_proxy(mlflow_server, delay_s=0.5)) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        with warnings_recorded() as caught:
            added, epochs = _log_like_a_stage()

    assert epochs == 3
    assert added < OPEN_TIMEOUT_S + DRAIN_TIMEOUT_S + 1
    tracking_warnings = [w for w in caught if w.category is TrackingWarning]
    assert len(tracking_warnings) <= 1
    if not tracking_warnings:
        client = MlflowClient(tracking_uri=mlflow_server)
        experiment = client.get_experiment_by_name("tpp-pipeline")
        [run] = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = 'evaluate'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "test_acc")) == 3


@contextmanager
def warnings_recorded() -> Iterator[list]:
    """Every warning raised inside, none required."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
