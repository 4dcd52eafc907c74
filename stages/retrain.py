"""Stage 3: fine-tune the physically pruned network with a fresh SGD optimizer and a milestone LR schedule, following its
trainability (mean Jacobian singular value) epoch by epoch."""

from pipeline import experiment
from pipeline.checkpoint import check_matches_data, load_checkpoint, save_checkpoint
from pipeline.config import Config
from pipeline.data import build_loaders
from pipeline.stage import FINAL_CHECKPOINT, METRICS_DIR, PLOTS_DIR, PRUNED_CHECKPOINT, prepare_run, resume_file, \
    run_stage, stage_settings, write_history, write_json
from pipeline.tracking import track_stage


def main(config: Config) -> None:
    runtime = prepare_run(config)
    train, test, info = build_loaders(config.data, batch_size=config.retrain.batch_size, seed=config.seed,
                                      device=runtime.device, rank=runtime.rank, world_size=runtime.world_size)
    checkpoint = load_checkpoint(PRUNED_CHECKPOINT, device=runtime.device)
    check_matches_data(checkpoint, PRUNED_CHECKPOINT, info.num_classes, info.input_shape)
    resume = resume_file("retrain", config, inputs=[PRUNED_CHECKPOINT])
    with track_stage("retrain", params=stage_settings(config, "retrain"), enabled=runtime.is_main) as tracker:
        history = experiment.retrain(config, checkpoint.model, train, test, runtime, resume=resume,
                                     on_epoch=lambda record: tracker.log_metrics(record.metrics(), step=record.epoch))
        if not runtime.is_main:
            return
        metrics = {"final_test_acc": history[-1].test_acc, "best_test_acc": max(r.test_acc for r in history)}
        digest = save_checkpoint(FINAL_CHECKPOINT, checkpoint.model, checkpoint.architecture, pruned=checkpoint.pruned,
                                 config=stage_settings(config, "retrain"), metrics=metrics)
        write_json(METRICS_DIR / "retrain.json", metrics)
        write_history(PLOTS_DIR / "retrain.csv", history)
        tracker.log_metrics(metrics)
        tracker.set_tags({"checkpoint.final.sha256": digest})
    if resume is not None:
        resume.remove()


if __name__ == "__main__":
    run_stage(main)
