"""Disks as a source of user errors: an output folder that cannot be written (permissions, a read-only file
system) or a full disk, found before a stage starts its work and explained in one paragraph when met anyway.

A stage that discovers an unwritable folder only when it saves its checkpoint has already spent its training
time; probing every folder the pipeline writes costs one tiny file each.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterable, Optional

from pipeline.errors import PipelineError

PROBE_PREFIX = ".write-probe-"
FIXES = {
    errno.EACCES: "your user may not write there: give it write permission (chmod/chown) or run the pipeline in a "
                  "copy of the repository that you own",
    errno.EPERM: "your user may not write there: give it write permission (chmod/chown) or run the pipeline in a "
                 "copy of the repository that you own",
    errno.EROFS: "that file system is mounted read-only: remount it read-write or run the pipeline in a copy of "
                 "the repository on a writable disk",
    errno.ENOSPC: "the disk is full: free space (`dvc gc --workspace` drops cached versions no longer used, and "
                  "old results/ or mlartifacts/ folders can go) or move the DVC cache with `dvc cache dir`",
    errno.EDQUOT: "your disk quota is used up: free space in your quota or ask for a larger one",
}


class StorageError(PipelineError):
    """A folder the pipeline must write is unwritable or its disk is full."""


def explain(error: OSError) -> Optional[str]:
    """One paragraph naming the file, the problem and the fix, for the disk problems a user can fix; None for
    other OS errors (those are bugs or missing inputs, reported elsewhere)."""
    fix = FIXES.get(error.errno or 0)
    if fix is None:
        return None
    where = f" {error.filename}" if error.filename else ""
    return (f"Could not write{where}: {error.strerror or os.strerror(error.errno)}. {fix[0].upper()}{fix[1:]}, "
            f"then run the stage again (`dvc repro`); outputs already in place were left as they were.")


def check_writable(folders: Iterable[Path]) -> None:
    """Write and remove one byte in each folder (or, when it does not exist yet, in the nearest existing parent,
    where it will be created), so that an unwritable or full disk stops the stage before any work."""
    for folder in folders:
        try:
            _probe(_nearest_existing(Path(folder)))
        except OSError as error:
            message = explain(error)
            if message is None:
                raise
            raise StorageError(message) from None


def _probe(folder: Path) -> None:
    """Create a hidden file in `folder`, write one byte (a full disk refuses it), remove it; errors name the
    folder rather than the probe file."""
    path = folder / f"{PROBE_PREFIX}{os.getpid()}"
    try:
        with open(path, "wb", buffering=0) as handle:
            handle.write(b"\0")
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(folder)) from None
    finally:
        path.unlink(missing_ok=True)


def _nearest_existing(folder: Path) -> Path:
    for candidate in (folder, *folder.parents):
        if candidate.is_dir():
            return candidate
    return Path(".")
