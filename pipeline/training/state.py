"""Resume checkpoints: everything the training loop needs to continue a killed run exactly where it stopped.

A resume file holds the model, optimizer, LR scheduler, gradient scaler, the hooks' state (TPP's schedule
position), every RNG (python, numpy, torch, CUDA) of every process (a list indexed by rank), the state of the
generator that draws the current epoch's sample order (the next epoch's in a file written at an epoch end), the
position inside the epoch, the epoch's running sums and the history so far. It is written atomically and carries a
fingerprint of what produced it (settings, data, code, input checkpoints): a file with another fingerprint is
discarded with a message, never reused. Files load with `torch.load(weights_only=True)`.

`kill_point` is a test hook: tests/test_resume.py and tests/test_train.py set `KILL_AT_VARIABLE` to kill a run at
an exact position (after a step, right after a checkpoint, during the epoch-end evaluation) instead of at a
moment picked by timing. Unset, it does nothing.
"""

from __future__ import annotations

import io
import os
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np
import torch

from pipeline.files import atomic_write_bytes

RESUME_FORMAT = "tpp-pipeline/resume"
RESUME_VERSION = 2
KILL_AT_VARIABLE = "TPP_PIPELINE_TEST_KILL_AT"


@dataclass(frozen=True)
class ResumeFile:
    """Where a phase keeps its resume state, and the fingerprint a file must carry to be reused.

    `announce` receives the one-line messages (resuming, discarding) so that only the main process prints them.
    """

    path: Path
    fingerprint: str
    announce: Callable[[str], None] = print

    def load(self, *, quiet: bool = False) -> Optional[Dict[str, Any]]:
        """The saved state if the file exists, is readable and was written for this fingerprint; else None.
        `quiet` (every process but the main one) announces nothing."""
        if not self.path.is_file():
            return None
        announce = (lambda line: None) if quiet else self.announce
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: discard it, never crash on it
            announce(f"discarding {self.path}: it is not a readable resume file ({type(error).__name__}); "
                          f"starting from the beginning")
            return None
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT \
                or state.get("version") != RESUME_VERSION:
            announce(f"discarding {self.path}: written by another version of tpp-pipeline; starting from the "
                          f"beginning")
            return None
        if state.get("fingerprint") != self.fingerprint:
            announce(f"discarding {self.path}: it was written under other settings, data, code or input "
                          f"checkpoints; starting from the beginning")
            return None
        return state

    def save(self, state: Mapping[str, Any]) -> None:
        """Write atomically (temp file + rename): a kill during the write leaves the previous file intact."""
        buffer = io.BytesIO()
        torch.save({"format": RESUME_FORMAT, "version": RESUME_VERSION, "fingerprint": self.fingerprint, **state},
                   buffer)
        atomic_write_bytes(self.path, buffer.getvalue())

    def remove(self) -> None:
        """Called once the phase's outputs are written: the state is no longer needed."""
        self.path.unlink(missing_ok=True)


def capture_rng() -> Dict[str, Any]:
    """Every RNG a step may draw from, in a form `torch.load(weights_only=True)` accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put every RNG back where `capture_rng` found it."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def kill_point(stage: str, event: str, number: int) -> None:
    """Test hook: SIGKILL this process when `KILL_AT_VARIABLE` is `<stage>:<event>:<number>`; see the module doc.

    The loop's events: `step` (after step N, before its checkpoint), `checkpoint` (right after the step
    checkpoint at step N), `evaluate` (in epoch N's evaluation, between the test pass and the hooks' measurements),
    `epoch_end` (right after epoch N's checkpoint, before the next epoch's first batch). Under torchrun only
    rank 0, the one that writes the resume file, is killed (torchrun then stops the others), so the file left
    behind does not depend on which process died first."""
    if os.environ.get(KILL_AT_VARIABLE) == f"{stage}:{event}:{number}" and os.environ.get("RANK", "0") == "0":
        kill()


def kill() -> None:
    """What `kill_point` does: SIGKILL, like `kill -9` (in-process tests replace it with raising an exception)."""
    os.kill(os.getpid(), signal.SIGKILL)
