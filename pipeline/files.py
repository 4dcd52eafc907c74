"""Atomic file writes: a stage killed midway must never leave a half-written output for DVC to cache."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a hidden temporary file beside `path`, then rename it into place (atomic on POSIX).

    A failed write (a full disk, say) removes the temporary file and leaves any previous `path` untouched; the
    OSError propagates so the stage reports it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` for text, UTF-8 encoded."""
    atomic_write_bytes(path, text.encode())
