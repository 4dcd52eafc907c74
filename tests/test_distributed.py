"""Multi-process training: a stage asked for `trainer.devices: 2` relaunches itself under torchrun (gloo on CPU)
and trains with DistributedDataParallel; its result equals a one-process run with the same global batch, and only
the main process writes files and tracks."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ddp_workers import free_port, run_processes, train
from pipeline.data import TensorBatches
from pipeline.data.batches import batch_bounds
from pipeline.errors import ConfigError
from pipeline.training.launcher import first_host, launch_command
from tiny_repo import TINY, environment, make_repo, run

# No BatchNorm (per-process batch statistics would legitimately differ), so both runs compute the same function.
SETTINGS = {"model.name": "mlp7_linear", "model.options": {}, "pretrain.epochs": 2, "pretrain.milestones": [1],
            "pretrain.lr": 0.05, "prune.layers": ["layers.[0-5]"], "prune.ratio": 0.5, "prune.reg.delta": 0.25,
            "prune.reg.stabilize_steps": 20, "trainability.jsv_samples": 0}
TOLERANCE = 1e-3


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def max_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max((first[key].float() - second[key].float()).abs().max().item() for key in first)


def stage_runs(repo: Path, stage: str) -> int:
    with sqlite3.connect(repo / "mlflow.db") as connection:
        return connection.execute("SELECT COUNT(*) FROM runs WHERE name = ?", (stage,)).fetchone()[0]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("distributed"), SETTINGS)


@pytest.mark.slow  # a stage run once alone and once under torchrun with 2 processes: about 1 min each
@pytest.mark.parametrize("stage, output", [("pretrain", "models/dense.pt"), ("prune", "models/pruned.pt")])
def test_two_processes_equal_one_with_the_same_global_batch(repo: Path, stage: str, output: str) -> None:
    tracking = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    _, single_log = run(["python", f"stages/{stage}.py"], repo, **tracking)
    single = weights(repo / output)
    runs_before = stage_runs(repo, stage)
    _, log = run(["python", f"stages/{stage}.py", "trainer.devices=2"], repo, **tracking)
    assert max_difference(single, weights(repo / output)) < TOLERANCE
    epoch_lines = [line for line in log.splitlines() if line.startswith(f"[{stage}] epoch")]
    assert len(epoch_lines) == len([line for line in single_log.splitlines() if line.startswith(f"[{stage}] epoch")])
    assert stage_runs(repo, stage) == runs_before + 1, "only the main process tracks"
    assert not (repo / "resume").exists() or not any((repo / "resume").iterdir())


def test_more_processes_than_gpus_is_refused_before_any_work(repo: Path) -> None:
    code, log = run(["python", "stages/pretrain.py", "trainer.devices=2", "device=cuda"], repo, check=False)
    assert code == 2 and "no usable CUDA GPU" in log and "Traceback" not in log


@pytest.mark.slow  # the whole tiny pipeline under `dvc repro` with two processes per training stage: minutes
def test_whole_pipeline_with_two_processes_writes_every_output_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # evaluate must time latency with the machine's threads
    repo = make_repo(tmp_path, {**TINY, "trainer.devices": 2})
    _, output = run(["dvc", "repro"], repo, TPP_PIPELINE_RUN="two-processes",
                    MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    assert "Traceback" not in output
    assert output.count("[evaluate]") <= 1 and output.count("Running stage 'evaluate'") == 1
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs(client.get_experiment_by_name("tpp-pipeline").experiment_id)
    parents = [r for r in runs if r.data.tags.get("tpp.pipeline_key") == "two-processes"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(children) == ["evaluate", "pretrain", "prune", "retrain"], "every stage tracked exactly once"
    metrics = json.loads((repo / "metrics/evaluate.json").read_text())
    assert metrics["dense_acc"] > 50 and metrics["final_acc"] > 50, metrics
    latency = json.loads((repo / "metrics/latency.json").read_text())
    assert latency["torch_threads"] == len(os.sched_getaffinity(0)), "evaluate ran with one thread, not the machine's"
    assert latency["onnx_max_abs_diff"] < 1e-3, "models/final.onnx computes what the final network does"
    assert sorted(path.name for path in (repo / "models").iterdir() if not path.name.startswith(".")) == [
        "dense.pt", "final.onnx", "final.pt", "pruned.pt", "pruned_layers.json"]
    assert not list(repo.glob("resume/*")), "no resume file left behind"


@pytest.mark.parametrize("samples, batch, world", [(9, 4, 2), (11, 4, 4), (10, 5, 2), (3, 8, 2), (64, 8, 4)])
def test_every_rank_gets_a_share_of_every_batch_and_each_sample_comes_once(samples, batch, world) -> None:
    shards = [list(TensorBatches(torch.arange(samples), torch.arange(samples), batch, shuffle=True, seed=1,
                                 rank=rank, world_size=world)) for rank in range(world)]
    single = list(TensorBatches(torch.arange(samples), torch.arange(samples), batch, shuffle=True, seed=1))
    assert len({len(batches) for batches in shards}) == 1 and len(shards[0]) == len(batch_bounds(samples, batch, world))
    seen = []
    for index in range(len(shards[0])):
        sizes = [len(shards[rank][index][1]) for rank in range(world)]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, sizes
        seen += [value for rank in range(world) for value in shards[rank][index][1].tolist()]
    assert sorted(seen) == list(range(samples))
    assert torch.equal(torch.cat([targets for _, targets in single]).sort().values, torch.arange(samples))


@pytest.mark.slow  # three small trainings, two of them in two spawned processes: about 30 s, minutes under load
def test_two_processes_with_uneven_shards_and_batchnorm_train_like_one(tmp_path: Path) -> None:
    """Shares of 3/3 and 3/2 samples: DDP's weighted average and the synchronised BatchNorm give one process's
    result; with per-process BatchNorm statistics the result is clearly another."""
    single = train()
    synced = run_processes("train", tmp_path, sync_bn=True)
    per_shard = run_processes("train", tmp_path, sync_bn=False)
    assert max_difference(single, synced) < 1e-5
    assert max_difference(single, per_shard) > 1e-2


@pytest.mark.slow  # two spawned processes: about 10 s, more under load
def test_ranks_start_from_the_same_weights_and_draw_their_own_dropout_masks(tmp_path: Path) -> None:
    result = run_processes("dropout_masks", tmp_path)
    first, second = result["initial"]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(*result["masks"]), "every rank drew the same dropout mask"


@pytest.mark.slow  # a BN ResNet pretrained three times (1 process; 2 with and without sync BN): minutes
def test_batchnorm_resnet_on_two_processes_equals_one_only_with_synchronised_batchnorm(tmp_path: Path) -> None:
    # Three steps (1,437 digits in global batches of 512; the last split 207/206): rounding differences between one
    # and two processes grow with every SGD step (about 1e-7 after 2 steps, 3e-5 after 8 at batch 64), so a short
    # run keeps the tolerance tight enough to catch per-process statistics.
    repo = make_repo(tmp_path, {**TINY, "pretrain.epochs": 1, "pretrain.milestones": [], "pretrain.batch_size": 512})
    run(["python", "stages/pretrain.py"], repo)
    single = weights(repo / "models/dense.pt")
    run(["python", "stages/pretrain.py", "trainer.devices=2"], repo)
    synced = max_difference(single, weights(repo / "models/dense.pt"))
    run(["python", "stages/pretrain.py", "trainer.devices=2", "trainer.sync_bn=false"], repo)
    per_process = max_difference(single, weights(repo / "models/dense.pt"))
    print(f"max |weight difference| to one process: sync BN {synced:.3g}, per-process BN {per_process:.3g}")
    assert synced < 1e-4 < per_process


@pytest.mark.slow  # two torchrun agents ("nodes") of one process each, and one process alone: about 2 min
def test_two_nodes_over_loopback_equal_one_process(repo: Path) -> None:
    tracking = {"MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    run(["python", "stages/pretrain.py"], repo, **tracking)
    single = weights(repo / "models/dense.pt")
    runs_before = stage_runs(repo, "pretrain")
    nodes = {**tracking, "TPP_LAUNCHER": "manual", "TPP_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
             "TPP_RDZV_ID": f"test-{os.getpid()}", "TPP_LOCAL_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
             "PYTHONPATH": str(repo)}
    command = ["python", "stages/pretrain.py", "trainer.nodes=2", "trainer.devices=1"]
    agents = [subprocess.Popen(command, cwd=repo, env=environment(**nodes), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=900)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert max_difference(single, weights(repo / "models/dense.pt")) < TOLERANCE
    assert stage_runs(repo, "pretrain") == runs_before + 1, "only the main process tracks"
    assert sum(output.count("[pretrain] epoch 2/2") for output in outputs) == 1


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2", "SLURM_CPUS_PER_TASK": "32"}
PROGRAM = ["/venv/bin/python", "stages/pretrain.py", "prune.ratio=0.5"]


def test_launch_command_inside_a_slurm_job_starts_one_agent_per_node() -> None:
    command = launch_command(8, 2, PROGRAM, SLURM, srun_found=True)
    assert command == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=32",
                       "--kill-on-bad-exit=1", "/venv/bin/python", "-m", "torch.distributed.run",
                       "--nproc_per_node=8", "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu07:29642",
                       "--rdzv-id=4242", "--max-restarts=0", "stages/pretrain.py", "prune.ratio=0.5"]
    manual = launch_command(8, 2, PROGRAM, {**SLURM, "TPP_LAUNCHER": "manual", "MASTER_PORT": "1234"})
    assert manual[:2] == ["/venv/bin/python", "-m"] and "--rdzv-endpoint=gpu07:29642" in manual
    explicit = launch_command(1, 2, PROGRAM, {"TPP_RDZV_ENDPOINT": "10.0.0.1:5000", "TPP_LOCAL_ADDR": "10.0.0.2"})
    assert "--rdzv-endpoint=10.0.0.1:5000" in explicit and "--local-addr=10.0.0.2" in explicit
    assert "--rdzv-id=tpp-pipeline" in explicit
    assert launch_command(4, 1, PROGRAM, SLURM, srun_found=True)[:5] == [
        "/venv/bin/python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]


@pytest.mark.parametrize("nodelist, host", [("gpu07", "gpu07"), ("gpu[07-08]", "gpu07"), ("a01,b02", "a01"),
                                            ("gpu[11,07-08],cpu01", "gpu11"), ("node-[3-4]-ib", "node-3-ib")])
def test_first_host_of_a_slurm_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


@pytest.mark.parametrize("environ, message", [
    ({}, "never falls back to localhost"),
    ({**SLURM, "SLURM_NNODES": "3"}, "has 3 node"),
    ({"TPP_RDZV_ENDPOINT": "node01"}, "not host:port"),
    ({**SLURM, "SLURM_JOB_NODELIST": "[bad"}, "could not be read"),
    ({**SLURM, "TPP_LAUNCHER": "mpi"}, "TPP_LAUNCHER"),
])
def test_multi_node_launch_without_a_clear_endpoint_is_refused(environ: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        launch_command(2, 2, PROGRAM, environ, srun_found=True)


@pytest.mark.slow  # two spawned processes: about 10 s, more under load
def test_a_worker_that_does_not_see_the_workspace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="do not share one workspace"):
        run_processes("blind_workspace", tmp_path, workspace=str(tmp_path))
