"""GPU check: the pipeline's stages end to end on CUDA, on CIFAR-shaped files, in the fast modes: `trainer.step:
graph` and `data.loader: device` for pretrain, prune (TPP) and retrain, then evaluate with every latency target.
A check, not a benchmark: it exits 1 when TPP's removal costs more than `--max-drop` points of test accuracy
(accuracy right after removal against accuracy just before it, both in metrics/prune.json) or a latency target
failed (metrics/latency.json lists it with its error).

    python benchmarks/cuda_stages.py [--device cuda|cpu] [--step graph|compile|eager] [--model resnet56]
        [--train-images N] [--pretrain-epochs N] [--set KEY=VALUE ...] [--json PATH]

The stages' own `main` functions run in a temporary workspace, with the settings of params.yaml plus the overrides
below. Tracking is switched off (the GPU machines have no MLflow, and tracking shapes no output), and without
matplotlib the accuracy chart is left out; nothing else is replaced. The data are learnable synthetic CIFAR-10
files (each class a colour under noise), so accuracy is high and a lossy removal shows.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
sys.path.insert(0, str(REPOSITORY / "benchmarks"))

from pipeline.config import LATENCY_TARGETS, load_config  # noqa: E402
from synthetic_cifar import write_cifar10  # noqa: E402

STAGES = ("pretrain", "prune", "retrain", "evaluate")


class _NoTracking:
    """Every tracker call accepted and dropped."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _track_stage(*args: Any, **kwargs: Any) -> Iterator[_NoTracking]:
    yield _NoTracking()


def switch_off_tracking() -> None:
    """`pipeline.tracking` without MLflow: the stages import `track_stage` from it."""
    module = types.ModuleType("pipeline.tracking")
    module.track_stage = _track_stage
    sys.modules["pipeline.tracking"] = module


def load_stage(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPOSITORY / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overrides(args: argparse.Namespace, data_root: Path) -> List[str]:
    milestone = args.pretrain_epochs - 1 if args.pretrain_epochs > 1 else ""
    return [f"device={args.device}", f"model.name={args.model}", f"trainer.step={args.step}", "trainer.resume=false",
            "data.name=cifar10", f"data.root={data_root}", "data.loader=device", "data.num_workers=0",
            f"pretrain.epochs={args.pretrain_epochs}", "pretrain.batch_size=128",
            f"pretrain.milestones=[{milestone}]", "retrain.epochs=1", "retrain.milestones=[]",
            "trainability.jsv_samples=8", "evaluate.latency_repeats=10",
            f"evaluate.targets=[{','.join(LATENCY_TARGETS)}]", *args.set]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--step", default="graph", choices=("eager", "compile", "graph"))
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--train-images", type=int, default=12800)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--pretrain-epochs", type=int, default=4)
    parser.add_argument("--max-drop", type=float, default=1.0, help="allowed accuracy change at removal (points)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="further settings overrides")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    switch_off_tracking()
    try:
        import matplotlib  # noqa: F401
        chart = True
    except ImportError:
        chart = False
    figures: Dict[str, Any] = {"settings": vars(args) | {"json": str(args.json)}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="tpp-cuda-stages-") as folder:
        workspace = Path(folder)
        write_cifar10(workspace / "data", args.train_images, args.test_images, learnable=True)
        config = load_config(overrides(args, workspace / "data"), path=REPOSITORY / "params.yaml")
        os.environ["DVC_ROOT"] = str(workspace)
        os.chdir(workspace)
        for name in STAGES:
            if name == "evaluate" and not chart:
                sys.modules["matplotlib"] = types.ModuleType("matplotlib")   # only the chart needs it
                sys.modules["matplotlib"].use = lambda backend: None
                sys.modules["matplotlib.pyplot"] = types.ModuleType("matplotlib.pyplot")
            stage = load_stage(name)
            if name == "evaluate" and not chart:
                stage.accuracy_chart = lambda histories, path: None
            started = time.perf_counter()
            stage.main(config)
            figures["seconds"][name] = round(time.perf_counter() - started, 1)
            print(f"[check] {name} done in {figures['seconds'][name]} s", flush=True)
        prune = json.loads(Path("metrics/prune.json").read_text())
        latency = json.loads(Path("metrics/latency.json").read_text())
        evaluate = json.loads(Path("metrics/evaluate.json").read_text())
    drop = prune["acc_before_removal"] - prune["acc_after_pruning"]
    figures.update(prune=prune, evaluate=evaluate, latency=latency, removal_drop=drop, chart=chart)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"[check] test accuracy before removal {prune['acc_before_removal']:.2f} %, right after "
          f"{prune['acc_after_pruning']:.2f} % (change {-drop:+.2f} points, allowed ±{args.max_drop:g})")
    print(f"[check] latency targets timed: {sorted(latency['targets'])}; failed: {latency['failed'] or 'none'}; "
          f"skipped: {latency['skipped'] or 'none'}")
    for target, batches in latency["targets"].items():
        for batch, row in batches.items():
            print(f"[check]   {target} {batch}: dense {row['dense_ms']:.3f} ms, pruned {row['pruned_ms']:.3f} ms, "
                  f"speed-up {row['speedup']:.2f}×")
    sys.exit(0 if abs(drop) <= args.max_drop and not latency["failed"] else 1)


if __name__ == "__main__":
    main()
