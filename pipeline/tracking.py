"""Experiment tracking with MLflow: one parent run per pipeline execution, one nested run per stage.

Each DVC stage is its own process, so the parent run cannot be handed over in memory: the first stage of an
execution creates it (RUNNING, tagged with the execution's key) and later stages find it by that tag. The key is
TPP_PIPELINE_RUN, else DVC_EXP_NAME (set by `dvc exp run`), else host and process group (all stages of one
`dvc repro` share the process group of the dvc command). The last stage closes the parent.

Tracking is a convenience next to DVC's own metrics, so it must never break or hold up a stage: the first failure
to reach or write the store warns once and turns tracking off for the rest of the stage. MLflow calls run in order
on one background thread, so logging never waits for the store; the stage waits only to open its run and, at its
end, for what is still queued, and with a server (which may hang, answer slowly or not at all) each of those waits
is bounded: at most OPEN_TIMEOUT_S + DRAIN_TIMEOUT_S added to a stage, whatever the server does.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import sqlite3
import threading
import time
import warnings
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

from pipeline.config import project_root

DEFAULT_EXPERIMENT = "tpp-pipeline"
PIPELINE_KEY_TAG = "tpp.pipeline_key"
STAGE_TAG = "tpp.stage"
SERVER_PROBE_TIMEOUT_S = 5.0
# Longest waits for a tracking server: opening the stage's run, then sending what is queued when the stage ends.
OPEN_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 15.0
# MLflow's own HTTP defaults (120 s read timeout, 7 retries with exponential backoff) keep a background call busy
# for many minutes; these apply unless the user set the variables.
HTTP_REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                         "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, token usage); with it, on the
# runs table, which is what a training pipeline's experiment holds.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
REMOTE_SCHEMES = ("http", "https", "databricks")
DVC_EXPERIMENTS_FOLDER = ".dvc/tmp/exps"
INVALID_KEY_CHARACTERS = re.compile(r"[^\w./\- :]")
MODEL_EXAMPLE_BATCH = 2
SENDER_THREAD_PREFIX = "mlflow-sender-"
# MLflow loggers that print a store error's traceback before raising it.
STORE_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store")  # torch.export, which MLflow saves models with, fixes a batch of 1

Entity = TypeVar("Entity")


class TrackingWarning(UserWarning):
    """MLflow tracking was turned off for a stage; the stage itself goes on."""


def tracking_root() -> Path:
    """The repository whose store gets the runs; a queued DVC experiment's temporary copy maps to its repo."""
    root = project_root()
    for folder in root.parents:
        if folder.match(DVC_EXPERIMENTS_FOLDER):
            return folder.parent.parent.parent
    return root


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI if set, else a SQLite store at the repository root so every stage shares it."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def artifact_location(uri: str, root: Path) -> str | None:
    """Where a new experiment keeps artifacts: `<root>/mlartifacts`, unless a server manages its own."""
    if _is_remote(uri):
        return None
    return (root / "mlartifacts").as_uri()


def experiment_name() -> str:
    """MLFLOW_EXPERIMENT_NAME if set, else the project's experiment."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def pipeline_key() -> str:
    """What all stages of one pipeline execution share, to find their parent run across processes.

    Quotes and backslashes become '_' because the key is matched inside a quoted MLflow search filter.
    """
    key = (os.environ.get("TPP_PIPELINE_RUN") or os.environ.get("DVC_EXP_NAME")
           or f"{socket.gethostname()}:{os.getpgid(0)}")
    return re.sub(r"['\"\\]", "_", key)


@dataclass(frozen=True)
class RunGroup:
    """The parent run that stage runs nest under: found across processes by `key`, named '<label> <run id>'."""

    key: str
    label: str
    experiment: str
    named_by_settings: bool = False


def pipeline_group() -> RunGroup:
    """The group of one pipeline execution: its stages, each a separate process, share `pipeline_key()`."""
    return RunGroup(pipeline_key(), "pipeline", experiment_name(), named_by_settings=True)


# What defines a pipeline run, in the order a person reads it: (tag, settings path, label in the run's name).
DEFINING_SETTINGS = (("tpp.model", ("model", "name"), ""), ("tpp.data", ("data", "name"), ""),
                     ("tpp.method", ("prune", "method"), ""), ("tpp.ratio", ("prune", "ratio"), ""),
                     ("tpp.round_to", ("prune", "round_to"), "round "), ("tpp.lr", ("retrain", "lr"), "lr "))


def defining_tags(params: Mapping[str, Any]) -> dict[str, str]:
    """The settings that tell runs apart (model, data, method, ratio, alignment, retraining LR), as tags: those of
    them that `params` holds, nested (`{"model": {"name": ...}}`) or by dotted key (`{"model.name": ...}`)."""
    flat = flatten_params(params)
    return {tag: flat[".".join(path)] for tag, path, _ in DEFINING_SETTINGS if ".".join(path) in flat}


def run_name(tags: Mapping[str, str]) -> str | None:
    """A run's name from its defining tags, e.g. 'resnet56 digits tpp 0.9 lr 0.01' ('round 8' only when
    aligned), so the MLflow run list reads as the experiments it holds."""
    if not tags:
        return None
    parts = [f"{label}{tags[tag]}" for tag, _, label in DEFINING_SETTINGS
             if tag in tags and not (tag == "tpp.round_to" and tags[tag] == "1")]
    return " ".join(parts)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys (prune.reg.alpha), string values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[mlflow_key(name)] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return flat


def mlflow_key(name: str) -> str:
    """A key MLflow accepts: characters it refuses (such as '*' in layer patterns) become '_'."""
    return INVALID_KEY_CHARACTERS.sub("_", name)


def _chunks(entities: Sequence[Entity], size: int) -> Iterator[Sequence[Entity]]:
    """Slices within MLflow's per-request batch limits."""
    for start in range(0, len(entities), size):
        yield entities[start:start + size]


def _is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme in REMOTE_SCHEMES


def _bound_http_requests() -> None:
    """Short MLflow HTTP timeouts and few retries, unless the user chose their own."""
    for name, value in HTTP_REQUEST_DEFAULTS.items():
        os.environ.setdefault(name, value)


def _check_server_reachable(uri: str) -> None:
    """Fail fast on a server that is down: MLflow's client retries a refused connection for minutes."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=SERVER_PROBE_TIMEOUT_S):
        pass


def _check_sqlite_openable(uri: str) -> None:
    """Fail fast on a SQLite file that cannot be opened: MLflow retries opening it for about 100 s."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA schema_version")


def _experiment_id(client: MlflowClient, name: str, location: str | None) -> str:
    """The experiment's id, creating it on first use (another stage process may win that race), marked as a
    model-training experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    for key, value in EXPERIMENT_KIND.items():
        if key not in experiment.tags:  # made before the tag was set; a kind the user chose stays
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def _parent_run_id(client: MlflowClient, experiment_id: str, group: RunGroup) -> str:
    """The RUNNING parent run of this group (a pipeline execution, a study), created by the first stage that asks."""
    running = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{group.key}' AND attributes.status = 'RUNNING'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if running:
        return running[0].info.run_id
    run_id = client.create_run(experiment_id, tags={PIPELINE_KEY_TAG: group.key}).info.run_id
    client.update_run(run_id, name=f"{group.label} {run_id[:8]}")
    return run_id


def _send_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log flattened params in requests within MLflow's batch limit."""
    entries = [Param(key, value) for key, value in flatten_params(params).items()]
    for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def _send_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log one step's metrics in as few requests as MLflow's batch limit allows (one, in practice)."""
    now_ms = int(time.time() * 1000)
    entries = [Metric(mlflow_key(key), float(value), now_ms, step) for key, value in metrics.items()]
    for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def _send_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Log tags in requests within MLflow's batch limit."""
    entries = [RunTag(mlflow_key(key), str(value)) for key, value in tags.items()]
    for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)


def _send_artifact(client: MlflowClient, run_id: str, path: Path) -> None:
    """Copy a file, or a folder under its own name, into the run's artifacts."""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=path.name)
    else:
        client.log_artifact(run_id, str(path))


def _name_run(client: MlflowClient, run_id: str, name: str | None, tags: Mapping[str, str]) -> None:
    client.update_run(run_id, name=name)
    _send_tags(client, run_id, tags)


def _send_model(client: MlflowClient, run_id: str, uri: str, model: Any, input_example: Any,
                tags: Mapping[str, str]) -> None:
    """mlflow.pytorch.log_model into the run's experiment, with the pipeline's code (the classes the pickled model
    needs) and pinned requirements (MLflow's inference of them would load the model in a subprocess).

    MLflow's default format exports the model with torch.export, which fixes every dimension of size 1 in the
    input example: an example of one image would give a model that refuses any other batch size, so the example
    holds `MODEL_EXAMPLE_BATCH` copies of it."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    import pipeline

    input_example = np.repeat(input_example[:1], MODEL_EXAMPLE_BATCH, axis=0)
    model = model.cpu().eval()
    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    mlflow.pytorch.log_model(model, name="model", run_id=run_id, input_example=input_example,
                             signature=infer_signature(input_example, output), tags=dict(tags),
                             code_paths=[str(Path(pipeline.__file__).parent)],
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


class _OnlyOffTheSender(logging.Filter):
    """Drops log records made on a sender thread: MLflow's SQL store logs a whole SQLAlchemy traceback before it
    raises (a deleted or read-only mlflow.db), and on the sender that raise is already reported once, as the
    TrackingWarning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(SENDER_THREAD_PREFIX)


def _quiet_store_errors() -> None:
    for name in STORE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _OnlyOffTheSender) for existing in logger.filters):
            logger.addFilter(_OnlyOffTheSender())


class _Sender:
    """A daemon thread that makes MLflow calls one at a time, in order. A call stuck on a server that never answers
    only holds this thread, which the stage stops waiting for (and which ends with the process)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        _quiet_store_errors()
        threading.Thread(target=self._loop, name=f"{SENDER_THREAD_PREFIX}{name}", daemon=True).start()

    def submit(self, call: Callable[[], None]) -> None:
        self._calls.put(call)

    def wait(self, timeout: float | None) -> bool:
        """Whether every call submitted so far finished within `timeout` seconds (None: however long it takes)."""
        done = threading.Event()
        self._calls.put(done.set)
        return done.wait(timeout)

    def close(self) -> None:
        """Let the thread end once it is through the calls already submitted."""
        self._calls.put(None)

    def _loop(self) -> None:
        while (call := self._calls.get()) is not None:
            call()


class StageTracker:
    """Logs one stage run to MLflow; never lets a tracking failure fail the stage, nor a slow store hold it up.

    `run_id` and `parent_run_id` name the stage's run and its pipeline's run; `run_id` is None once tracking is off.
    """

    def __init__(self, stage: str, group: RunGroup | None = None) -> None:
        self.stage = stage
        self.group = group or pipeline_group()
        self.root = tracking_root()
        self.uri = tracking_uri(self.root)
        self.run_id: str | None = None
        self.parent_run_id: str | None = None
        self._client: MlflowClient | None = None
        self._sender: _Sender | None = None
        self._failure: tuple[str, Exception] | None = None
        remote = _is_remote(self.uri)
        self._open_timeout = OPEN_TIMEOUT_S if remote else None
        self._drain_timeout = DRAIN_TIMEOUT_S if remote else None

    def start(self) -> None:
        """Open this stage's run under the pipeline's parent run, creating either as needed."""
        if _is_remote(self.uri):
            _bound_http_requests()
        opened: dict[str, Any] = {}
        self._sender = _Sender(f"mlflow-{self.stage}")
        self._sender.submit(self._guarded("open the stage's run", lambda: opened.update(self._open())))
        if not self._sender.wait(self._open_timeout):
            self._turn_off("open the stage's run", TimeoutError(f"no answer within {self._open_timeout:g} s"))
            return
        if self._failure is not None:
            self._turn_off(*self._failure)
            return
        self._client, self.parent_run_id, self.run_id = opened["client"], opened["parent_run_id"], opened["run_id"]

    def _open(self) -> dict[str, Any]:
        """The MLflow calls that open the stage's run (on the sender thread)."""
        _check_server_reachable(self.uri)
        _check_sqlite_openable(self.uri)
        client = MlflowClient(tracking_uri=self.uri)
        experiment_id = _experiment_id(client, self.group.experiment, artifact_location(self.uri, self.root))
        parent_run_id = _parent_run_id(client, experiment_id, self.group)
        run = client.create_run(experiment_id, run_name=self.stage,
                                tags={MLFLOW_PARENT_RUN_ID: parent_run_id, STAGE_TAG: self.stage})
        return {"client": client, "parent_run_id": parent_run_id, "run_id": run.info.run_id}

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log settings; nested mappings become dotted keys. MLflow params cannot change once logged."""
        self._attempt("log params", lambda client, run_id: _send_params(client, run_id, params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one step's metrics (an epoch, say) in a single request rather than one per value."""
        self._attempt("log metrics", lambda client, run_id: _send_metrics(client, run_id, metrics, step or 0))

    def describe(self, params: Mapping[str, Any]) -> None:
        """Tag the stage run with what defines it and, for a pipeline execution, name its parent run by it."""
        tags = defining_tags(params)
        if not tags:
            return
        self.set_tags(tags)
        parent_run_id, name = self.parent_run_id, run_name(tags)
        if self.group.named_by_settings and parent_run_id is not None:
            self._attempt("name the pipeline's run", lambda client, _: _name_run(client, parent_run_id, name, tags))

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        """The few numbers people compare, on the stage run and on its parent (the row the MLflow UI lists)."""
        self.log_metrics(metrics)
        parent_run_id = self.parent_run_id
        if parent_run_id is not None:
            self._attempt("log the pipeline's summary",
                          lambda client, _: _send_metrics(client, parent_run_id, metrics, 0))

    def log_model(self, model: Any, input_example: Any, tags: Mapping[str, str]) -> None:
        """Log `model` as an MLflow PyTorch model of the stage run (`mlflow.pytorch.load_model` returns it), with an
        input example, its signature and `tags`."""
        self._attempt("log the model", lambda client, run_id: _send_model(client, run_id, self.uri, model,
                                                                            input_example, tags))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Attach descriptive labels (device, git commit, ...) to the stage run."""
        self._attempt("set tags", lambda client, run_id: _send_tags(client, run_id, tags))

    def log_artifact(self, path: Path) -> None:
        """Copy a file, or a folder under its own name, into the stage run's artifacts."""
        self._attempt(f"log {path}", lambda client, run_id: _send_artifact(client, run_id, Path(path)))

    def finish(self, status: str, close_pipeline: bool) -> None:
        """End the stage run with `status` (a RunStatus name), and the parent run too for the last stage; then wait
        (bounded, for a server) until everything queued was sent."""
        parent_run_id = self.parent_run_id
        self._attempt("end the stage's run", lambda client, run_id: client.set_terminated(run_id, status))
        if close_pipeline and parent_run_id is not None:
            self._attempt("end the pipeline's run", lambda client, _: client.set_terminated(parent_run_id, status))
        if self._sender is None:
            return
        if self.run_id is not None and not self._sender.wait(self._drain_timeout):
            self._turn_off("send the stage's last records", TimeoutError(
                f"they were still not sent {self._drain_timeout:g} s after the stage ended"))
        elif self.run_id is not None and self._failure is not None:
            self._turn_off(*self._failure)
        self._sender.close()

    def _attempt(self, action: str, call: Callable[[MlflowClient, str], object]) -> None:
        """Queue one MLflow call if tracking is still on; a failure (reported at the next call or at the end) turns
        it off instead of failing the stage."""
        if self._client is None or self.run_id is None or self._sender is None:
            return
        if self._failure is not None:
            self._turn_off(*self._failure)
            return
        client, run_id = self._client, self.run_id
        self._sender.submit(self._guarded(action, lambda: call(client, run_id)))

    def _guarded(self, action: str, call: Callable[[], object]) -> Callable[[], None]:
        """`call` as the sender runs it: skipped after a failure, and its own failure recorded, never raised."""
        def guarded() -> None:
            if self._failure is not None:
                return
            try:
                call()
            except Exception as error:
                self._failure = (action, error)
        return guarded

    def _turn_off(self, action: str, error: Exception) -> None:
        """Warn once, then make every later call a no-op so one broken store costs one message."""
        self._client, self.run_id = None, None
        cause = _root_cause(error)
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        warnings.warn(
            f"MLflow tracking is off for the rest of stage '{self.stage}': could not {action} in the store "
            f"{self.uri} ({type(cause).__name__}: {reason}). The stage goes on, and its DVC outputs and "
            f"metrics are unaffected. To track later runs, make that store writable (or the server "
            f"reachable), or point MLFLOW_TRACKING_URI at one that is.",
            TrackingWarning,
        )


def _root_cause(error: BaseException) -> BaseException:
    """The innermost exception: MLflow wraps the store's own error (say, sqlite3's 'attempt to write a readonly
    database') in messages about sessions and autoflush."""
    while (inner := error.__cause__ or error.__context__) is not None:
        error = inner
    return error


@contextmanager
def track_stage(stage: str, *, params: Mapping[str, Any] | None = None, close_pipeline: bool = False,
                group: RunGroup | None = None, enabled: bool = True) -> Iterator[StageTracker]:
    """Track one stage as a run nested in its group's run (the pipeline's by default); FAILED (and re-raised) if
    the body raises.

    `close_pipeline` marks the last stage: the parent run ends with this stage's status. A failed stage always
    ends the parent too (DVC stops the pipeline there), so a later execution never attaches to a dead parent.
    With `enabled` false (DDP ranks other than 0) every call is a no-op.
    """
    tracker = StageTracker(stage, group)
    if enabled:
        tracker.start()
    if params:
        tracker.describe(params)
        tracker.log_params(params)
    try:
        yield tracker
    except BaseException as error:
        interrupted = isinstance(error, KeyboardInterrupt)
        tracker.finish(RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED), True)
        raise
    tracker.finish(RunStatus.to_string(RunStatus.FINISHED), close_pipeline)
