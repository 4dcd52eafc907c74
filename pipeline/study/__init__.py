"""Studies: the paper's comparisons (methods × ratios × schedules × seeds) in one command, cached cell by cell.

`runner` computes the grid through the same phases as the DVC stages; `outputs` writes its tables, report and plots.
Run one with `python -m pipeline.study studies/<name>.yaml` (or `make study NAME=<name>`).
"""

from pipeline.study.runner import load_study, main, run_study

__all__ = ["load_study", "main", "run_study"]
