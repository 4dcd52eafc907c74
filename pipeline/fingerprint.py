"""Fingerprints of what produced a result (settings, files, library code), to tell reusable state from stale.

Resume checkpoints and the study cache are reused only when their fingerprint matches: state made under other
settings, data or code is recomputed, never silently reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

CODE_FOLDER = Path(__file__).resolve().parent
PRESENTATION_MODULES = ("tracking/__init__.py", "tracking/naming.py", "tracking/store.py", "tracking/tracker.py",
                        "progress.py", "report.py", "study/outputs.py")


def fingerprint(parts: Mapping[str, Any]) -> str:
    """A stable hash of JSON-serialisable parts (settings, file hashes, code hash)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def code_fingerprint() -> str:
    """Hash of the library code that shapes results: state is reused only by the code that made it.

    Presentation-only modules (tracking, progress bars, reports) are left out, as in dvc.yaml, so editing a chart
    never discards hours of computed work.
    """
    digest = hashlib.sha256()
    for path in sorted(CODE_FOLDER.rglob("*.py")):
        relative = path.relative_to(CODE_FOLDER).as_posix()
        if relative in PRESENTATION_MODULES:
            continue
        digest.update(relative.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def files_fingerprint(paths: Iterable[Path], *, content: bool) -> str:
    """Hash of every file under `paths` in a fixed order: its path and size, plus its bytes with `content`, else
    its modification time (cheap enough for an ImageNet folder, and any rewrite of a file changes it)."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
        for file in (f for f in files if f.is_file()):
            stat = file.stat()
            digest.update(f"{file.as_posix()}:{stat.st_size}".encode())
            if content:
                with open(file, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            else:
                digest.update(str(stat.st_mtime_ns).encode())
    return digest.hexdigest()
