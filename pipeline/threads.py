"""How many CPU threads this process may use, so that jobs run side by side share the cores instead of each
taking all of them (two stages or studies at once, `dvc queue start -j N`, the tasks of a Ray study).

The share is, first, `OMP_NUM_THREADS` when set: torchrun, Ray (a task's `num_cpus`) and a user's shell set it,
and it is the hard guarantee. Otherwise it is the cores this process may run on divided by the pipeline jobs
running on this machine, which every job announces by holding a lock file in a per-user folder for as long as it
lives (the operating system drops the lock with the process, however it ends). A job registers before it counts,
so of two jobs that start together at least the later one sees both and takes half; the share is decided once, at
the start of a stage or study task.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO, Dict, Optional, Tuple

import torch

from pipeline.progress import console

JOBS_FOLDER = Path(tempfile.gettempdir()) / f"tpp-pipeline-jobs-{os.getuid()}"
_registrations: Dict[Path, IO[str]] = {}   # held open (locked) until the process ends


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a SLURM or taskset allocation)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _omp_threads() -> Optional[int]:
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def running_jobs(folder: Path = JOBS_FOLDER) -> int:
    """Register this process (once) and count the pipeline jobs alive on this machine, this one included.

    A lock file whose lock can be taken belongs to a job that has ended: it is removed. A file is locked before
    it gets its counted name, so a job that is registering is never mistaken for an ended one.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if folder not in _registrations:
        pending = folder / f".{os.getpid()}"
        handle = open(pending, "w")
        fcntl.flock(handle, fcntl.LOCK_EX)
        pending.rename(folder / str(os.getpid()))
        _registrations[folder] = handle
    alive = 0
    for path in folder.iterdir():
        if path.name.startswith("."):
            continue
        try:
            with open(path, "r") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alive += 1
                    continue
                path.unlink(missing_ok=True)
        except FileNotFoundError:
            continue
    return max(alive, 1)


def thread_share() -> Tuple[int, str]:
    """`OMP_NUM_THREADS` when set, else this machine's cores divided by the pipeline jobs running on it; with the
    reason, for the log."""
    explicit = _omp_threads()
    if explicit is not None:
        return explicit, "OMP_NUM_THREADS"
    jobs = running_jobs()
    return max(1, available_cores() // jobs), f"{available_cores()} cores / {jobs} pipeline job(s) running"


def use_thread_share(label: str) -> int:
    """Set torch's intra-op thread count to this process's share of the cores, say so in the log, return it."""
    share, reason = thread_share()
    torch.set_num_threads(share)
    console.print(f"[threads] {label}: {share} thread(s) ({reason})", markup=False, soft_wrap=True)
    return share
