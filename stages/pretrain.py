"""Stage 1: train the dense network from scratch on the configured dataset."""

from pipeline import experiment
from pipeline.checkpoint import Architecture, save_checkpoint
from pipeline.config import Config, config_to_dict
from pipeline.data import build_loaders
from pipeline.measure.cost import count_macs, count_parameters
from pipeline.stage import DENSE_CHECKPOINT, METRICS_DIR, PLOTS_DIR, prepare_run, run_stage, write_history, \
    write_json
from pipeline.tracking import track_stage


def main(config: Config) -> None:
    device = prepare_run(config)
    train, test, info = build_loaders(config.data, batch_size=config.pretrain.batch_size, seed=config.seed,
                                      device=device)
    architecture = Architecture(config.model.name, info.num_classes, info.input_shape, config.model.options)
    with track_stage("pretrain", params=config_to_dict(config)) as tracker:
        model, history = experiment.pretrain(
            config, architecture, train, test, device,
            on_epoch=lambda record: tracker.log_metrics(record.metrics(), step=record.epoch))
        metrics = {"final_test_acc": history[-1].test_acc, "best_test_acc": max(r.test_acc for r in history),
                   "params": count_parameters(model),
                   "macs": count_macs(model, architecture.example_inputs(device))}
        digest = save_checkpoint(DENSE_CHECKPOINT, model, architecture, config=config_to_dict(config),
                                 metrics=metrics)
        write_json(METRICS_DIR / "pretrain.json", metrics)
        write_history(PLOTS_DIR / "pretrain.csv", history)
        tracker.log_metrics(metrics)
        tracker.set_tags({"checkpoint.dense.sha256": digest})


if __name__ == "__main__":
    run_stage(main)
