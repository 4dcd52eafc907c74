"""Stage 4: compare dense, just-pruned and retrained networks: accuracy, size, MACs and measured latency."""

from pipeline import experiment
from pipeline.checkpoint import check_matches_data, load_checkpoint
from pipeline.config import Config, config_to_dict
from pipeline.data import build_loaders
from pipeline.measure.cost import count_macs, count_parameters, latency_pair
from pipeline.report import accuracy_chart, markdown_report, read_history
from pipeline.stage import DENSE_CHECKPOINT, FINAL_CHECKPOINT, METRICS_DIR, PLOTS_DIR, PRUNED_CHECKPOINT, \
    REPORTS_DIR, prepare_run, run_stage, write_json
from pipeline.tracking import track_stage
from pipeline.training.loop import evaluate


def main(config: Config) -> None:
    runtime = prepare_run(config)
    device = runtime.device
    _, test, info = build_loaders(config.data, batch_size=config.evaluate.latency_batch_size, seed=config.seed,
                                  device=device)
    checkpoints = {path: load_checkpoint(path, device=device)
                   for path in (DENSE_CHECKPOINT, PRUNED_CHECKPOINT, FINAL_CHECKPOINT)}
    for path, checkpoint in checkpoints.items():
        check_matches_data(checkpoint, path, info.num_classes, info.input_shape)
    dense, pruned, final = (checkpoints[path].model for path in checkpoints)
    example = checkpoints[DENSE_CHECKPOINT].architecture.example_inputs(device)
    batch = example.expand(config.evaluate.latency_batch_size, *example.shape[1:]).contiguous()
    with track_stage("evaluate", params=config_to_dict(config), close_pipeline=True) as tracker:
        dense_latency, pruned_latency = latency_pair(dense, final, batch, config.evaluate.latency_repeats)
        metrics = {
            "model": config.model.name, "dataset": config.data.name, "method": config.prune.method,
            "device": str(device), "latency_batch_size": config.evaluate.latency_batch_size,
            "dense_acc": evaluate(dense, test, device, runtime.amp)[1],
            "pruned_acc": evaluate(pruned, test, device, runtime.amp)[1],
            "final_acc": evaluate(final, test, device, runtime.amp)[1],
            "best_retrain_acc": checkpoints[FINAL_CHECKPOINT].metrics["best_test_acc"],
            "params_dense": count_parameters(dense), "params_pruned": count_parameters(final),
            "macs_dense": count_macs(dense, example), "macs_pruned": count_macs(final, example),
            "pruned_filters": sum(len(idx) for idx in checkpoints[FINAL_CHECKPOINT].pruned.values()),
            "latency_dense_ms": 1000 * dense_latency, "latency_pruned_ms": 1000 * pruned_latency,
        }
        probe = experiment.trainability_inputs(config, test, device)
        if probe is not None:
            metrics.update({f"jsv_{name}": experiment.trainability(model, probe)
                            for name, model in (("dense", dense), ("pruned", pruned), ("final", final))})
        metrics.update(sparsity=1 - metrics["params_pruned"] / metrics["params_dense"],
                       speedup_macs=metrics["macs_dense"] / metrics["macs_pruned"],
                       speedup_latency=dense_latency / pruned_latency)
        histories = {phase: read_history(PLOTS_DIR / f"{phase}.csv") for phase in ("pretrain", "prune", "retrain")}
        accuracy_chart(histories, REPORTS_DIR / "accuracy.png")
        markdown_report(metrics, REPORTS_DIR / "report.md")
        write_json(METRICS_DIR / "evaluate.json", metrics)
        tracker.log_metrics({key: value for key, value in metrics.items() if isinstance(value, (int, float))})
        tracker.log_artifact(REPORTS_DIR / "report.md")
        tracker.log_artifact(REPORTS_DIR / "accuracy.png")


if __name__ == "__main__":
    run_stage(main)
