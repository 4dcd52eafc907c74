"""Stage 2: choose the filters once from the dense weights, run the pruning method (TPP by default), and
physically remove them."""

from pipeline import experiment
from pipeline.checkpoint import check_matches_data, load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.data import build_loaders
from pipeline.methods import REGULARIZED_METHODS
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.progress import console
from pipeline.stage import DENSE_CHECKPOINT, METRICS_DIR, PLOTS_DIR, PRUNED_CHECKPOINT, PRUNED_LAYERS, prepare_run, \
    resume_file, run_stage, stage_settings, write_history, write_json
from pipeline.pruning.selection import pruning_summary
from pipeline.pruning.regularizer import LambdaSchedule
from pipeline.tracking import track_stage
from pipeline.training.loop import evaluate


def main(config: Config) -> None:
    runtime = prepare_run(config)
    train, test, info = build_loaders(config.data, batch_size=config.prune.batch_size, seed=config.seed,
                                      device=runtime.device, rank=runtime.rank, world_size=runtime.world_size)
    dense = load_checkpoint(DENSE_CHECKPOINT, device=runtime.device)
    check_matches_data(dense, DENSE_CHECKPOINT, info.num_classes, info.input_shape)
    example = dense.architecture.example_inputs(runtime.device)
    selection = experiment.select(config, dense.model, example)
    summary = pruning_summary(dense.model, selection)
    dense_params, dense_macs = count_parameters(dense.model), count_macs(dense.model, example)
    if runtime.is_main:
        _announce(config, summary, len(train))
    resume = resume_file("prune", config, inputs=[DENSE_CHECKPOINT])
    with track_stage("prune", params=stage_settings(config, "prune"), enabled=runtime.is_main) as tracker:
        outcome = experiment.prune(config, dense.model, selection, example, train, test, runtime, resume=resume,
                                   on_epoch=lambda record: tracker.log_metrics(record.metrics(), step=record.step))
        if not runtime.is_main:
            return
        _, accuracy = evaluate(outcome.model, test, runtime.device, runtime.amp)
        params, macs = count_parameters(outcome.model), count_macs(outcome.model, example)
        metrics = {"acc_after_pruning": accuracy, "params": params, "macs": macs,
                   "params_ratio": params / dense_params, "speedup_macs": dense_macs / macs,
                   "pruned_filters": sum(layer["pruned"] for layer in summary.values()), **outcome.metrics}
        digest = save_checkpoint(PRUNED_CHECKPOINT, outcome.model, dense.architecture, pruned=outcome.pruned,
                                 config=stage_settings(config, "prune"), metrics=metrics)
        write_json(METRICS_DIR / "prune.json", metrics)
        write_json(PRUNED_LAYERS, summary)
        write_history(PLOTS_DIR / "prune.csv", outcome.history)
        tracker.log_metrics(metrics)
        tracker.set_tags({"checkpoint.pruned.sha256": digest, "prune.method": config.prune.method})
    if resume is not None:
        resume.remove()


def _announce(config: Config, summary: dict, steps_per_epoch: int) -> None:
    """State the plan up front: what is pruned and how long TPP's schedule runs (a derived, often large figure)."""
    filters = sum(layer["filters"] for layer in summary.values())
    removed = sum(layer["pruned"] for layer in summary.values())
    console.print(f"[prune] method {config.prune.method}: {removed} of {filters} filters in {len(summary)} layers "
                  f"({100 * removed / max(filters, 1):.1f}%)", markup=False, soft_wrap=True)
    if config.prune.method in REGULARIZED_METHODS:
        schedule = LambdaSchedule.from_config(config.prune.reg)
        console.print(f"[prune] λ schedule: {schedule.update_steps} update steps (+{schedule.delta:g} every "
                      f"{schedule.interval} steps up to {schedule.max_lambda:g}) + {schedule.stabilize_steps} "
                      f"stabilize steps = {schedule.total_steps} steps ≈ "
                      f"{schedule.total_steps / steps_per_epoch:.1f} epochs", markup=False, soft_wrap=True)


if __name__ == "__main__":
    run_stage(main)
