"""The CLI owns the screen: rich progress and tables on stderr, exit codes, one-line errors.

Exit codes (documented in the README):
    0  everything succeeded
    1  the run finished but some inputs failed (each reported with its reason)
    2  usage or configuration error: bad option, unknown model or finding, no inputs
    130 interrupted (Ctrl-C); finished outputs are kept, re-running resumes
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print a one-line error on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def note(message: str) -> None:
    err.print(message, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", soft_wrap=True)


def progress_bar(*, transient: bool = False) -> Progress:
    """A stderr progress bar; plain (no animation) when stderr is not a terminal."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=transient,
        disable=os.environ.get("CXRTOOL_NO_PROGRESS") == "1",
    )


@contextmanager
def handle_interrupt():
    """Turn Ctrl-C into exit 130 with a note that finished outputs were kept."""
    try:
        yield
    except KeyboardInterrupt:
        note("[yellow]interrupted:[/] finished outputs are kept; run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
