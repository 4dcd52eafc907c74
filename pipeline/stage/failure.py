"""User errors as one paragraph and exit status 2 instead of a traceback; anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

from rich.markup import escape

from pipeline.errors import PipelineError
from pipeline.progress import console
from pipeline.storage import explain


@contextmanager
def reported_errors() -> Iterator[None]:
    """User errors (settings, data, checkpoints, an unwritable or full disk) as one paragraph and exit status 2
    instead of a traceback; anything else is a bug and keeps its traceback."""
    try:
        yield
    except PipelineError as error:
        fail(str(error))
    except OSError as error:
        message = explain(error)
        if message is None:
            raise
        fail(message)


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(2)
