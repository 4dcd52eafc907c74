"""What every stage script shares, a module per concern: `entry` (entry point, run set-up), `failure` (user errors
as one paragraph), `paths`, `resume` (resume files) and `writers` (metrics and history files); which settings
each stage reads is `pipeline.settings_files`.

Stage scripts stay thin: they read settings, call library functions and write their declared outputs, always
at the very end, atomically and from the main process only, so a stage refused for bad input or killed midway
leaves no half-written file. A stage asked for several devices relaunches itself under torchrun.
"""

from pipeline.settings_files import stage_settings
from pipeline.stage.entry import prepare_run, run_stage
from pipeline.stage.failure import reported_errors
from pipeline.stage.paths import (DENSE_CHECKPOINT, FINAL_CHECKPOINT, METRICS_DIR, PLOTS_DIR, PRUNED_CHECKPOINT,
                                  PRUNED_LAYERS, REPORTS_DIR, RESUME_DIR, WRITTEN_FOLDERS)
from pipeline.stage.resume import resume_file
from pipeline.stage.writers import write_history, write_json

__all__ = ["DENSE_CHECKPOINT", "FINAL_CHECKPOINT", "METRICS_DIR", "PLOTS_DIR", "PRUNED_CHECKPOINT", "PRUNED_LAYERS",
           "REPORTS_DIR", "RESUME_DIR", "WRITTEN_FOLDERS", "prepare_run", "reported_errors", "resume_file", "run_stage",
           "stage_settings", "write_history", "write_json"]
