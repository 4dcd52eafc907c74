"""`plan`: what the prune stage will do to a model, worked out in seconds on the CPU before any training.

For the settings in params.yaml (or `key=value` overrides) it resolves the layer patterns, chooses the filter
counts (after `round_to`), lists what disappears with each layer (its BatchNorm, coupled layers, the next layers'
inputs), and removes the filters for real on a copy whose output must equal the dense network's with those channels
masked at every consumer's input: the parameter and MAC figures (per layer and in total) are exact, and a model the
dependency graph misreads (static split sizes, channel shuffles, stored widths) is refused with the layer named.

- `removal`: the per-layer plan and the trial removal (also the validate stage's structural check);
- `suggest`: every Conv/Linear layer classified, with ready-to-paste patterns (`--suggest`);
- `cli`: `python -m pipeline.plan [--json] [--suggest] [key=value ...]` (`make plan`), tables and JSON.

The package imports only `removal` and `suggest`, so the validate stage does not depend on how plans are printed.
"""

from pipeline.plan.removal import LayerPlan, Plan, check_prunable, make_plan, trial_removal
from pipeline.plan.suggest import suggest

__all__ = ["LayerPlan", "Plan", "check_prunable", "make_plan", "suggest", "trial_removal"]
