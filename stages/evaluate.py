"""Stage 4: compare dense, just-pruned and retrained networks: accuracy, size, MACs, and latency measured where
the network runs; export the final network to ONNX and log it to MLflow as a model."""

from pathlib import Path

from pipeline import experiment
from pipeline.checkpoint import check_matches_data, load_checkpoint
from pipeline.config import Config
from pipeline.data import build_loaders
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.measure.export import check_onnx, export_onnx, fold_batchnorm
from pipeline.measure.jacobian import first_inputs
from pipeline.measure.latency import environment, measure_targets, split_targets
from pipeline.report import accuracy_chart, latency_record, markdown_report, read_history, summary_record
from pipeline.stage import DENSE_CHECKPOINT, FINAL_CHECKPOINT, METRICS_DIR, PLOTS_DIR, PRUNED_CHECKPOINT, \
    REPORTS_DIR, prepare_run, run_stage, stage_settings, write_json
from pipeline.tracking import track_stage
from pipeline.training.loop import evaluate

FINAL_ONNX = Path("models/final.onnx")
ONNX_CHECK_SAMPLES = 64


def main(config: Config) -> None:
    runtime = prepare_run(config)
    device, batch_size = runtime.device, config.evaluate.latency_batch_size
    _, test, info = build_loaders(config.data, batch_size=batch_size, seed=config.seed, device=device)
    checkpoints = {path: load_checkpoint(path, device=device)
                   for path in (DENSE_CHECKPOINT, PRUNED_CHECKPOINT, FINAL_CHECKPOINT)}
    for path, checkpoint in checkpoints.items():
        check_matches_data(checkpoint, path, info.num_classes, info.input_shape)
    dense, pruned, final = (checkpoints[path].model for path in checkpoints)
    example = checkpoints[DENSE_CHECKPOINT].architecture.example_inputs(device)
    with track_stage("evaluate", params=stage_settings(config, "evaluate"), close_pipeline=True) as tracker:
        metrics = {
            "model": config.model.name or config.model.factory, "dataset": config.data.name,
            "method": config.prune.method,
            "dense_acc": evaluate(dense, test, device, runtime.amp)[1],
            "pruned_acc": evaluate(pruned, test, device, runtime.amp)[1],
            "final_acc": evaluate(final, test, device, runtime.amp)[1],
            "best_retrain_acc": checkpoints[FINAL_CHECKPOINT].metrics["best_test_acc"],
            "params_dense": count_parameters(dense), "params_pruned": count_parameters(final),
            "macs_dense": count_macs(dense, example), "macs_pruned": count_macs(final, example),
            "pruned_filters": sum(len(idx) for idx in checkpoints[FINAL_CHECKPOINT].pruned.values()),
        }
        probe = experiment.trainability_inputs(config, test, device)
        if probe is not None:
            metrics.update({f"jsv_{name}": experiment.trainability(model, probe)
                            for name, model in (("dense", dense), ("pruned", pruned), ("final", final))})
        metrics.update(sparsity=1 - metrics["params_pruned"] / metrics["params_dense"],
                       speedup_macs=metrics["macs_dense"] / metrics["macs_pruned"])
        export_onnx(fold_batchnorm(final), example, FINAL_ONNX)
        onnx_difference = check_onnx(FINAL_ONNX, final, first_inputs(test, ONNX_CHECK_SAMPLES, device))
        targets, skipped = split_targets(config.evaluate.targets, device)
        measured = measure_targets(dense, final, example, device, runtime.amp, sorted({1, batch_size}),
                                   config.evaluate.latency_repeats, runtime.channels_last, pruned_onnx=FINAL_ONNX,
                                   targets=targets)
        latency = latency_record(measured.comparisons, environment(device), metrics["speedup_macs"], onnx_difference,
                                 failed=measured.failed, skipped=skipped)
        summary = summary_record(metrics, latency, batch_size)
        histories = {phase: read_history(PLOTS_DIR / f"{phase}.csv") for phase in ("pretrain", "prune", "retrain")}
        accuracy_chart(histories, REPORTS_DIR / "accuracy.png")
        markdown_report(metrics, latency, REPORTS_DIR / "report.md")
        write_json(METRICS_DIR / "evaluate.json", metrics)
        write_json(METRICS_DIR / "latency.json", latency)
        write_json(METRICS_DIR / "summary.json", summary)
        tracker.log_summary(summary)
        tracker.log_metrics({key: value for key, value in metrics.items()
                             if isinstance(value, (int, float)) and key not in summary})
        tracker.log_metrics({f"latency.{target}.{batch}.{key}": value
                             for target, batches in latency["targets"].items()
                             for batch, row in batches.items() for key, value in row.items()})
        tracker.set_tags({f"latency.{key}": str(value) for key, value in latency.items() if key != "targets"})
        tracker.log_artifact(REPORTS_DIR / "report.md")
        tracker.log_artifact(REPORTS_DIR / "accuracy.png")
        tracker.log_model(final, example[:1].cpu().numpy(), tags={key: f"{value:.6g}" for key, value in {
            "sparsity": metrics["sparsity"], "macs": metrics["macs_pruned"], "accuracy": metrics["final_acc"],
            **{f"latency_speedup.{key}": value for key, value in summary.items() if key.startswith("speedup_")},
        }.items()})


if __name__ == "__main__":
    run_stage(main, trains=False)
