"""Studies: the paper's comparisons (methods × ratios × schedules × seeds) in one command, cached cell by cell.

`grid` reads a study file into its cells; `runner` computes them through the same phases as the DVC stages; `outputs` writes its tables, report and plots.
Run one with `python -m pipeline.study studies/<name>.yaml` (or `make study NAME=<name>`).
"""

from pipeline.study.grid import load_study
from pipeline.study.runner import main, run_study

__all__ = ["load_study", "main", "run_study"]
