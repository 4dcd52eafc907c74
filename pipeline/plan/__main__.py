"""`python -m pipeline.plan [--json] [--suggest] [key=value ...]`."""

from pipeline.plan.cli import main

main()
