"""Studies: the paper's comparisons (methods × ratios × schedules × seeds) in one command, cached cell by cell.

`grid` reads a study file into its cells; `runner` computes them through the same phases as the DVC stages; `outputs` writes its tables, report and plots.
Run one with `python -m pipeline.study studies/<name>.yaml` (or `make study NAME=<name>`).

The package imports nothing itself: a Ray worker that unpickles a task's function from `pieces` then imports only
what training needs, not the driver's tracking (MLflow) and reports.
"""
