"""Stage 0: check every setting in params.yaml and everything else that needs no training (the data, the starting
weights, the checkpoints in models/, and a trial removal of the selected filters, as `python -m pipeline.plan`
does), then write each stage's resolved settings to settings/<stage>.json. It runs before every other stage, so
a bad value stops `dvc repro` before DVC removes any output."""

import sys

from pipeline.config import project_root
from pipeline.preflight import SETTINGS_DIR, check_before_training, check_factory_watched, check_runnable, \
    check_starting_weights, write_stage_settings
from pipeline.settings import load_settings
from pipeline.stage import WRITTEN_FOLDERS, reported_errors
from pipeline.storage import check_writable


def main() -> None:
    with reported_errors():
        config = load_settings(sys.argv[1:])
        check_runnable(config)
        check_starting_weights(config, project_root())
        check_factory_watched(config, project_root())
        check_before_training(config, project_root())
        check_writable((*WRITTEN_FOLDERS, SETTINGS_DIR))
        write_stage_settings(config)


if __name__ == "__main__":
    main()
