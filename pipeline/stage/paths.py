"""Where stages read and write: the checkpoints, metrics, plots, reports and resume folders, relative to the
repository root DVC runs them in."""

from pathlib import Path

DENSE_CHECKPOINT = Path("models/dense.pt")
PRUNED_CHECKPOINT = Path("models/pruned.pt")
FINAL_CHECKPOINT = Path("models/final.pt")
PRUNED_LAYERS = Path("models/pruned_layers.json")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")
RESUME_DIR = Path("resume")
# Every folder a stage writes, probed before it starts so that an unwritable or full disk costs no work.
WRITTEN_FOLDERS = (DENSE_CHECKPOINT.parent, METRICS_DIR, PLOTS_DIR, REPORTS_DIR, RESUME_DIR)
