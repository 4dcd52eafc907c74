"""Errors a user can fix.

Every error raised on purpose by the pipeline is a `PipelineError` whose message is one paragraph naming the
problem and the fix; the stage runner prints it without a traceback and exits non-zero.
"""


class PipelineError(Exception):
    """An error caused by input the user controls (settings, data, checkpoints), not by a bug."""


class ConfigError(PipelineError):
    """A wrong key, type or value in params.yaml or a command-line override."""


class DataError(PipelineError):
    """A dataset that is missing, incomplete or in the wrong format."""


class CheckpointError(PipelineError):
    """A file that is not a checkpoint of ours, is corrupted, or does not match what the stage expects."""


class PruningError(PipelineError):
    """A pruning request that cannot be carried out on this model."""


class TrainingError(PipelineError):
    """Training that cannot go on, such as a loss that became NaN or infinite."""
