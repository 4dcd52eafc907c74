"""Progress display: rich bars on a terminal, and one plain line per epoch that stays readable in any log."""

from __future__ import annotations

from types import TracebackType
from typing import Optional, Type

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, highlight=False)


class StageProgress:
    """A step counter for one long loop; the bar only renders on a TTY, log lines always print."""

    def __init__(self, description: str, total: int, enabled: bool = True):
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                                  disable=not (enabled and console.is_terminal), transient=True)
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> "StageProgress":
        self._progress.start()
        return self

    def __exit__(self, kind: Optional[Type[BaseException]], error: Optional[BaseException],
                 trace: Optional[TracebackType]) -> None:
        self._progress.stop()

    def advance(self, steps: int = 1) -> None:
        self._progress.update(self._task, advance=steps)

    def log(self, line: str) -> None:
        """Print a plain line (above the bar on a terminal) with no markup interpretation."""
        console.print(line, markup=False, soft_wrap=True)
