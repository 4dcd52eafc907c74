"""`python -m pipeline.study studies/<name>.yaml [--output DIR]`."""

from pipeline.study.runner import main

main()
