"""Stage plumbing: DVC output files are deterministic, so identical runs leave DVC nothing to record."""

from pipeline.stage import write_history, write_json
from pipeline.training.loop import EpochRecord


def test_history_csv_leaves_out_wall_time_so_identical_runs_write_identical_files(tmp_path):
    fast = [EpochRecord(1, 23, 0.1, 0.5, 80.0, 0.4, 85.0, seconds=1.2)]
    slow = [EpochRecord(1, 23, 0.1, 0.5, 80.0, 0.4, 85.0, seconds=9.7)]
    write_history(tmp_path / "fast.csv", fast)
    write_history(tmp_path / "slow.csv", slow)
    assert (tmp_path / "fast.csv").read_bytes() == (tmp_path / "slow.csv").read_bytes()
    assert (tmp_path / "fast.csv").read_text().splitlines() == [
        "epoch,step,lr,train_loss,train_acc,test_loss,test_acc", "1,23,0.1,0.5,80.0,0.4,85.0"]


def test_outputs_are_written_whole_with_no_temporary_left_behind(tmp_path):
    write_json(tmp_path / "metrics" / "m.json", {"b": 1, "a": 2.5})
    assert (tmp_path / "metrics" / "m.json").read_text() == '{\n  "a": 2.5,\n  "b": 1\n}\n'
    assert [p.name for p in (tmp_path / "metrics").iterdir()] == ["m.json"]


def test_history_csv_has_a_column_for_each_measurement_the_hooks_added(tmp_path):
    history = [EpochRecord(1, 23, 0.1, 0.5, 80.0, 0.4, 85.0, 1.0, {"mean_jsv": 2.5}),
               EpochRecord(2, 46, 0.1, 0.3, 90.0, 0.3, 88.0, 1.0, {"mean_jsv": 2.25})]
    write_history(tmp_path / "retrain.csv", history)
    assert (tmp_path / "retrain.csv").read_text().splitlines() == [
        "epoch,step,lr,train_loss,train_acc,test_loss,test_acc,mean_jsv", "1,23,0.1,0.5,80.0,0.4,85.0,2.5",
        "2,46,0.1,0.3,90.0,0.3,88.0,2.25"]
