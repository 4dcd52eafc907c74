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

Modules: `naming` (where runs go and what they are called), `store` (the MLflow calls), `tracker` (the stage
tracker and its sender thread).
"""

from pipeline.tracking.naming import PIPELINE_KEY_TAG, STAGE_TAG, RunGroup, pipeline_key, tracking_root, tracking_uri
from pipeline.tracking.tracker import (DRAIN_TIMEOUT_S, OPEN_TIMEOUT_S, StageTracker, TrackingWarning,
                                       track_stage)

__all__ = ["DRAIN_TIMEOUT_S", "OPEN_TIMEOUT_S", "PIPELINE_KEY_TAG", "STAGE_TAG", "RunGroup", "StageTracker",
           "TrackingWarning", "pipeline_key", "track_stage", "tracking_root", "tracking_uri"]
