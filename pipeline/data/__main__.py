"""Command line: `python -m pipeline.data digits --root data` writes the offline default dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from pipeline.data.digits import materialize_digits


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line: write the offline default dataset into the data folder."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.data",
                                     description="Write the offline default dataset into the data folder.")
    parser.add_argument("dataset", choices=["digits"], help="the dataset to write (only digits works offline)")
    parser.add_argument("--root", type=Path, default=Path("data"), help="the data folder (default: data)")
    arguments = parser.parse_args(argv)
    folder = materialize_digits(arguments.root)
    print(f"Wrote the digits dataset to {folder}")


main()
