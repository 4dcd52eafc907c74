"""The MLflow calls a stage run makes, each a plain function of a client: fail-fast probes of the store, the
experiment and parent run found or created, and params, metrics, tags, artifacts and the model sent within MLflow's
batch limits. The tracker runs them on its sender thread."""

from __future__ import annotations

import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar
from urllib.parse import urlsplit

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from pipeline.tracking.naming import PIPELINE_KEY_TAG, RunGroup, flatten_params, mlflow_key

SERVER_PROBE_TIMEOUT_S = 5.0
# MLflow's own HTTP defaults (120 s read timeout, 7 retries with exponential backoff) keep a background call busy
# for many minutes; these apply unless the user set the variables.
HTTP_REQUEST_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                         "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# MLflow 3's UI opens an experiment without this tag on its GenAI overview (traces, token usage); with it, on the
# runs table, which is what a training pipeline's experiment holds.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
MODEL_EXAMPLE_BATCH = 2  # torch.export, which MLflow saves models with, fixes a batch of 1

Entity = TypeVar("Entity")


def chunks(entities: Sequence[Entity], size: int) -> Iterator[Sequence[Entity]]:
    """Slices within MLflow's per-request batch limits."""
    for start in range(0, len(entities), size):
        yield entities[start:start + size]


def bound_http_requests() -> None:
    """Short MLflow HTTP timeouts and few retries, unless the user chose their own."""
    for name, value in HTTP_REQUEST_DEFAULTS.items():
        os.environ.setdefault(name, value)


def check_server_reachable(uri: str) -> None:
    """Fail fast on a server that is down: MLflow's client retries a refused connection for minutes."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=SERVER_PROBE_TIMEOUT_S):
        pass


def check_sqlite_openable(uri: str) -> None:
    """Fail fast on a SQLite file that cannot be opened: MLflow retries opening it for about 100 s."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA schema_version")


def find_experiment(client: MlflowClient, name: str, location: str | None) -> str:
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


def find_parent_run(client: MlflowClient, experiment_id: str, group: RunGroup) -> str:
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


def send_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log flattened params in requests within MLflow's batch limit."""
    entries = [Param(key, value) for key, value in flatten_params(params).items()]
    for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)


def send_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log one step's metrics in as few requests as MLflow's batch limit allows (one, in practice)."""
    now_ms = int(time.time() * 1000)
    entries = [Metric(mlflow_key(key), float(value), now_ms, step) for key, value in metrics.items()]
    for chunk in chunks(entries, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def send_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    """Log tags in requests within MLflow's batch limit."""
    entries = [RunTag(mlflow_key(key), str(value)) for key, value in tags.items()]
    for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=chunk)


def send_artifact(client: MlflowClient, run_id: str, path: Path) -> None:
    """Copy a file, or a folder under its own name, into the run's artifacts."""
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path=path.name)
    else:
        client.log_artifact(run_id, str(path))


def name_run(client: MlflowClient, run_id: str, name: str | None, tags: Mapping[str, str]) -> None:
    client.update_run(run_id, name=name)
    send_tags(client, run_id, tags)


def send_model(client: MlflowClient, run_id: str, uri: str, model: Any, input_example: Any,
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
