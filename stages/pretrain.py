"""Stage 1: train the dense network on the configured dataset, from scratch or from imported weights."""

from pathlib import Path

from pipeline import experiment
from pipeline.checkpoint import Architecture, save_checkpoint
from pipeline.config import Config
from pipeline.data import build_loaders
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.models import model_spec
from pipeline.stage import DENSE_CHECKPOINT, METRICS_DIR, PLOTS_DIR, prepare_run, resume_file, run_stage, \
    stage_settings, write_history, write_json
from pipeline.tracking import track_stage
from pipeline.training.loop import evaluate


def main(config: Config) -> None:
    runtime = prepare_run(config)
    train, test, info = build_loaders(config.data, batch_size=config.pretrain.batch_size, seed=config.seed,
                                      device=runtime.device, rank=runtime.rank, world_size=runtime.world_size)
    spec = model_spec(config.model.name, config.model.factory)
    architecture = Architecture(spec, info.num_classes, info.input_shape, config.model.options)
    resume = resume_file("pretrain", config, inputs=[Path(config.model.checkpoint)] if config.model.checkpoint else [])
    with track_stage("pretrain", params=stage_settings(config, "pretrain"), enabled=runtime.is_main) as tracker:
        model, history = experiment.pretrain(
            config, architecture, train, test, runtime, resume=resume,
            on_epoch=lambda record: tracker.log_metrics(record.metrics(), step=record.epoch))
        if not runtime.is_main:
            return
        accuracy = history[-1].test_acc if history else evaluate(model, test, runtime.device, runtime.amp)[1]
        metrics = {"final_test_acc": accuracy, "best_test_acc": max([accuracy] + [r.test_acc for r in history]),
                   "params": count_parameters(model),
                   "macs": count_macs(model, architecture.example_inputs(runtime.device))}
        digest = save_checkpoint(DENSE_CHECKPOINT, model, architecture,
                                 config=stage_settings(config, "pretrain"), metrics=metrics)
        write_json(METRICS_DIR / "pretrain.json", metrics)
        write_history(PLOTS_DIR / "pretrain.csv", history)
        tracker.log_metrics(metrics)
        tracker.set_tags({"checkpoint.dense.sha256": digest})
    if resume is not None:
        resume.remove()


if __name__ == "__main__":
    run_stage(main)
