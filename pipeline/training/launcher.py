"""Starting a training stage on several processes and machines: the torchrun command and where it meets.

One machine (`trainer.nodes: 1`): `torchrun --standalone`, N processes on this machine. Several machines: one
torchrun agent per node, meeting on torchrun's c10d rendezvous at an endpoint taken from the environment, never
guessed: a multi-node request without one is an error, because agents that each fall back to localhost would form
separate one-node worlds and hang. Where the endpoint comes from, first match wins:

- `TPP_RDZV_ENDPOINT` (`host:port`);
- `MASTER_ADDR` (and `MASTER_PORT`, default 29400);
- under SLURM, the first host of `SLURM_JOB_NODELIST` and port 29400 + `SLURM_JOB_ID` mod 1000.

The rendezvous id is `TPP_RDZV_ID`, else `SLURM_JOB_ID`, else `tpp-pipeline`. `TPP_LOCAL_ADDR` is the address
this node advertises (`--local-addr`, for clusters without working DNS). How the agents start (`TPP_LAUNCHER`):
`srun` (the stage, run once by `dvc repro` in a SLURM job, starts one agent per node with `srun`), `manual` (the
user runs the same stage command on every node), `auto` (srun inside a SLURM job, else manual).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
from typing import List, Mapping, Sequence, Tuple

from pipeline.errors import ConfigError

PR_SET_PDEATHSIG = 1
DEFAULT_RDZV_PORT = 29400
SLURM_PORT_SPREAD = 1000
DEFAULT_RDZV_ID = "tpp-pipeline"
LAUNCHERS = ("auto", "srun", "manual")
_FIRST_ELEMENT = re.compile(r"[^,\[]*(\[[^\]]*\][^,\[]*)?")
_NODE_RANGE = re.compile(r"([^\[]*)\[([^\]]+)\](.*)")


def launch(devices: int, nodes: int, script: str, arguments: Sequence[str]) -> int:
    """Run `script` under torchrun (on `nodes` machines when asked); return its exit status.

    Workers default to one OpenMP thread each (they share the machine's cores); an explicit OMP_NUM_THREADS wins.
    """
    command = launch_command(devices, nodes, [sys.executable, script, *arguments], os.environ,
                             srun_found=shutil.which("srun") is not None)
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(command, env=environment, check=False, preexec_fn=die_with_parent).returncode


def launch_command(devices: int, nodes: int, program: Sequence[str], environ: Mapping[str, str], *,
                   srun_found: bool = False) -> List[str]:
    """The command that starts `program` (the interpreter and the stage script, with its arguments) on `devices`
    processes per node on `nodes` nodes."""
    python, script, *arguments = program
    torchrun = [python, "-m", "torch.distributed.run", f"--nproc_per_node={devices}"]
    if nodes == 1:
        return [*torchrun[:3], "--standalone", *torchrun[3:], script, *arguments]
    endpoint, rendezvous_id = rendezvous(nodes, environ)
    local = [f"--local-addr={environ['TPP_LOCAL_ADDR']}"] if environ.get("TPP_LOCAL_ADDR") else []
    agent = [*torchrun, f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
             f"--rdzv-id={rendezvous_id}", "--max-restarts=0", *local, script, *arguments]
    if _launcher(environ, srun_found) == "manual":
        return agent
    cpus = [f"--cpus-per-task={environ['SLURM_CPUS_PER_TASK']}"] if environ.get("SLURM_CPUS_PER_TASK") else []
    return ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", *cpus, "--kill-on-bad-exit=1",
            *agent]


def rendezvous(nodes: int, environ: Mapping[str, str]) -> Tuple[str, str]:
    """The c10d endpoint (`host:port`) and rendezvous id of a `nodes`-node run, from the environment."""
    slurm_nodes = environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES")
    if slurm_nodes and int(slurm_nodes) != nodes:
        raise ConfigError(f"params.yaml: 'trainer.nodes' is {nodes} but this SLURM job has {slurm_nodes} node(s). "
                          f"Set trainer.nodes to {slurm_nodes}, or submit the job with --nodes={nodes}.")
    identifier = environ.get("TPP_RDZV_ID") or environ.get("SLURM_JOB_ID") or DEFAULT_RDZV_ID
    if environ.get("TPP_RDZV_ENDPOINT"):
        endpoint = environ["TPP_RDZV_ENDPOINT"]
        if not re.fullmatch(r"[^\s:]+:\d+", endpoint):
            raise ConfigError(f"TPP_RDZV_ENDPOINT is '{endpoint}', not host:port. Set it to the address and a free "
                              f"port of the node that hosts the rendezvous, e.g. node01:29400.")
        return endpoint, identifier
    if environ.get("MASTER_ADDR"):
        return f"{environ['MASTER_ADDR']}:{environ.get('MASTER_PORT', DEFAULT_RDZV_PORT)}", identifier
    if environ.get("SLURM_JOB_NODELIST") and environ.get("SLURM_JOB_ID"):
        port = DEFAULT_RDZV_PORT + int(environ["SLURM_JOB_ID"]) % SLURM_PORT_SPREAD
        return f"{first_host(environ['SLURM_JOB_NODELIST'])}:{port}", identifier
    raise ConfigError(f"params.yaml: 'trainer.nodes' is {nodes}, but nothing says where the nodes meet: no SLURM "
                      f"job (SLURM_JOB_NODELIST), no TPP_RDZV_ENDPOINT and no MASTER_ADDR. Run inside a SLURM "
                      f"allocation (see scripts/slurm/train.sbatch), or set TPP_RDZV_ENDPOINT=host:port (one node's "
                      f"address and a free port) and TPP_LAUNCHER=manual and start the stage on every node; a "
                      f"multi-node run never falls back to localhost.")


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list (`gpu[07-08,11],cpu01` → `gpu07`), through `scontrol show
    hostnames` where it exists, else parsed here (the common forms: plain names, one bracketed range list)."""
    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                check=False)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    element = _FIRST_ELEMENT.match(nodelist.strip())
    head = element.group(0) if element else ""
    ranged = _NODE_RANGE.fullmatch(head)
    if ranged:
        prefix, ranges, suffix = ranged.groups()
        head = prefix + ranges.split(",")[0].split("-")[0] + suffix
    if not head or not re.fullmatch(r"[A-Za-z0-9._-]+", head):
        raise ConfigError(f"SLURM_JOB_NODELIST '{nodelist}' could not be read as a list of host names. Set "
                          f"TPP_RDZV_ENDPOINT=host:port to the first node's address instead.")
    return head


def _launcher(environ: Mapping[str, str], srun_found: bool) -> str:
    choice = environ.get("TPP_LAUNCHER", "auto")
    if choice not in LAUNCHERS:
        raise ConfigError(f"TPP_LAUNCHER is '{choice}', not one of {', '.join(LAUNCHERS)}. Use srun (start one "
                          f"agent per node of this SLURM job), manual (you start the stage on every node) or auto.")
    if choice == "srun" and not srun_found:
        raise ConfigError("TPP_LAUNCHER is 'srun' but no `srun` command is on PATH. Run inside a SLURM job, or use "
                          "TPP_LAUNCHER=manual and start the stage on every node.")
    if choice == "auto":
        return "srun" if environ.get("SLURM_JOB_ID") and srun_found else "manual"
    return choice


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    torchrun starts its workers in sessions of their own, so a `kill -9` of the stage (or of DVC) would leave them
    training as orphans that race the next run for the resume file and the outputs. With this on torchrun and on
    every worker, killing the stage kills the whole tree. A no-op off Linux.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
