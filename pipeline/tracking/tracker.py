"""The stage tracker: one stage run nested in its pipeline's run, logged from a background sender thread so that
a slow, hanging or broken store never breaks or holds up the stage.

Why a sender thread of our own rather than MLflow's asynchronous logging: MLflow's async queue covers only
metrics, params and tags logged through the fluent API, not opening the runs, artifacts or the model, and its
flush (also run at interpreter exit) joins its thread with no time limit; MLflow's HTTP timeout applies per socket
read, so a server that answers a byte at a time never trips it. Neither bounds what a stage waits for. Here the
stage waits at most OPEN_TIMEOUT_S to open its run and DRAIN_TIMEOUT_S at its end; the sender is a daemon thread
that the process does not wait for. MLflow's HTTP timeout and retry settings still bound each request it makes.
"""

from __future__ import annotations

import logging
import queue
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.tracking.naming import (STAGE_TAG, RunGroup, artifact_location, defining_tags, is_remote,
                                      pipeline_group, run_name, tracking_root, tracking_uri)
from pipeline.tracking.store import (bound_http_requests, check_server_reachable, check_sqlite_openable,
                                     find_experiment, find_parent_run, name_run, send_artifact, send_metrics,
                                     send_model, send_params, send_tags)

# Longest waits for a tracking server: opening the stage's run, then sending what is queued when the stage ends.
OPEN_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 15.0
SENDER_THREAD_PREFIX = "mlflow-sender-"
# MLflow loggers that print a store error's traceback before raising it.
STORE_LOGGERS = ("mlflow.store.db.utils", "mlflow.store.tracking.sqlalchemy_store")


class TrackingWarning(UserWarning):
    """MLflow tracking was turned off for a stage; the stage itself goes on."""


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
        remote = is_remote(self.uri)
        self._open_timeout = OPEN_TIMEOUT_S if remote else None
        self._drain_timeout = DRAIN_TIMEOUT_S if remote else None

    def start(self) -> None:
        """Open this stage's run under the pipeline's parent run, creating either as needed."""
        if is_remote(self.uri):
            bound_http_requests()
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
        check_server_reachable(self.uri)
        check_sqlite_openable(self.uri)
        client = MlflowClient(tracking_uri=self.uri)
        experiment_id = find_experiment(client, self.group.experiment, artifact_location(self.uri, self.root))
        parent_run_id = find_parent_run(client, experiment_id, self.group)
        run = client.create_run(experiment_id, run_name=self.stage,
                                tags={MLFLOW_PARENT_RUN_ID: parent_run_id, STAGE_TAG: self.stage})
        return {"client": client, "parent_run_id": parent_run_id, "run_id": run.info.run_id}

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log settings; nested mappings become dotted keys. MLflow params cannot change once logged."""
        self._attempt("log params", lambda client, run_id: send_params(client, run_id, params))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log one step's metrics (an epoch, say) in a single request rather than one per value."""
        self._attempt("log metrics", lambda client, run_id: send_metrics(client, run_id, metrics, step or 0))

    def describe(self, params: Mapping[str, Any]) -> None:
        """Tag the stage run with what defines it and, for a pipeline execution, name its parent run by it."""
        tags = defining_tags(params)
        if not tags:
            return
        self.set_tags(tags)
        parent_run_id, name = self.parent_run_id, run_name(tags)
        if self.group.named_by_settings and parent_run_id is not None:
            self._attempt("name the pipeline's run", lambda client, _: name_run(client, parent_run_id, name, tags))

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        """The few numbers people compare, on the stage run and on its parent (the row the MLflow UI lists)."""
        self.log_metrics(metrics)
        parent_run_id = self.parent_run_id
        if parent_run_id is not None:
            self._attempt("log the pipeline's summary",
                          lambda client, _: send_metrics(client, parent_run_id, metrics, 0))

    def log_model(self, model: Any, input_example: Any, tags: Mapping[str, str]) -> None:
        """Log `model` as an MLflow PyTorch model of the stage run (`mlflow.pytorch.load_model` returns it), with an
        input example, its signature and `tags`."""
        self._attempt("log the model", lambda client, run_id: send_model(client, run_id, self.uri, model,
                                                                            input_example, tags))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Attach descriptive labels (device, git commit, ...) to the stage run."""
        self._attempt("set tags", lambda client, run_id: send_tags(client, run_id, tags))

    def log_artifact(self, path: Path) -> None:
        """Copy a file, or a folder under its own name, into the stage run's artifacts."""
        self._attempt(f"log {path}", lambda client, run_id: send_artifact(client, run_id, Path(path)))

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
