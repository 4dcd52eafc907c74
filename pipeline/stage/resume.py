"""A stage's resume file, valid only for the settings, data, code and input checkpoints that made it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from pipeline.config import Config
from pipeline.fingerprint import code_fingerprint, files_fingerprint, fingerprint
from pipeline.progress import console
from pipeline.settings_files import stage_settings
from pipeline.stage.paths import RESUME_DIR
from pipeline.training import distributed
from pipeline.training.state import ResumeFile


def resume_file(stage: str, config: Config, inputs: Iterable[Path] = ()) -> Optional[ResumeFile]:
    """The stage's resume file, valid only for these settings, this data, this code and these input checkpoints;
    None when `trainer.resume` is off."""
    if not config.trainer.resume:
        return None
    def parts() -> Dict[str, Any]:
        return {"stage": stage, "settings": stage_settings(config, stage), "code": code_fingerprint(),
                "data": files_fingerprint([Path(config.data.root)], content=False),
                "inputs": files_fingerprint(inputs, content=True)}

    return ResumeFile(RESUME_DIR / f"{stage}.pt", distributed.on_main(lambda: fingerprint(parts())),
                      announce=lambda line: console.print(f"[{stage}] {line}", markup=False, soft_wrap=True))
