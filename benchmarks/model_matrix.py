"""Benchmark: how long the checks that need no training take per model of the coverage matrix. A measurement
script, not a test: it prints figures (and writes them as JSON with --json) and asserts nothing.

    .venv/bin/python benchmarks/model_matrix.py [--models torchvision/resnet18 ...] [--json PATH]

For each model of `tests/test_model_matrix.py` (32×32 inputs, random weights, on the CPU), in one process:

* build: constructing the network;
* suggest: `python -m pipeline.plan --suggest` (tracing the graph, classifying every Conv/Linear);
* validate: the validate stage's structural check (`check_prunable`: patterns, graph checks and a trial removal
  compared with the masked dense network) for `--suggest`'s prunable patterns at ratio 0.5; a refusal ends here;
* plan: `python -m pipeline.plan` for the same settings (the validate check plus per-layer counts and costs).

The outcome is "prunes" or "refused" (with the start of the message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from pipeline.errors import PruningError  # noqa: E402
from pipeline.models import create_model  # noqa: E402
from pipeline.plan import check_prunable, make_plan, suggest  # noqa: E402
from test_model_matrix import MATRIX, OPTIONS  # noqa: E402  (the matrix's models and options: one list)

EXAMPLE = torch.zeros(1, 3, 32, 32)


def timed(work: Callable[[], Any]) -> Tuple[Any, float]:
    start = time.perf_counter()
    result = work()
    return result, round(time.perf_counter() - start, 2)


def measure(spec: str) -> Dict[str, Any]:
    """One model's timings and outcome."""
    torch.manual_seed(0)
    row: Dict[str, Any] = {"model": spec}
    model, row["build_s"] = timed(lambda: create_model(spec, 10, in_channels=3, image_size=32,
                                                       **OPTIONS.get(spec, {})).eval())
    row["params"] = sum(parameter.numel() for parameter in model.parameters())
    try:
        rows, row["suggest_s"] = timed(lambda: suggest(model, EXAMPLE))
        patterns = sorted({str(r["pattern"]) for r in rows if r["kind"] == "prunable" and r["pattern"]})
        refused = [str(r["layer"]) for r in rows if str(r["kind"]).startswith("refused")]
        ratios = {pattern: 0.5 for pattern in patterns or refused[:1]}
        _, row["validate_s"] = timed(lambda: check_prunable(model, EXAMPLE, ratios))
        plan, row["plan_s"] = timed(lambda: make_plan(model, EXAMPLE, ratios))
        row["outcome"] = f"prunes ({len(plan.layers)} layers)"
    except PruningError as error:
        row["outcome"] = "refused: " + " ".join(str(error).split())[:90]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MATRIX))
    parser.add_argument("--json", type=Path, default=None)
    arguments = parser.parse_args()
    warnings.simplefilter("ignore")   # Torch-Pruning's and torchvision's notices would bury the table
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))))
    figures: List[Dict[str, Any]] = []
    print(f"{'model':34} {'params':>11} {'build':>6} {'suggest':>8} {'validate':>9} {'plan':>6}  outcome")
    for spec in arguments.models:
        row = measure(spec)
        figures.append(row)
        cells = [f"{row.get(key, '-'):>{width}}" for key, width in
                 (("build_s", 6), ("suggest_s", 8), ("validate_s", 9), ("plan_s", 6))]
        print(f"{spec:34} {row['params']:>11,} {' '.join(cells)}  {row['outcome']}", flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f} "
          f"at the end")
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
