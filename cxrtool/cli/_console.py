"""The CLI owns the screen: rich progress and tables on stderr, exit codes, one-line errors.

Exit codes (documented in the README):
    0  everything succeeded
    1  the run finished but some inputs failed (each reported with its reason)
    2  usage or configuration error: bad option, unknown model or finding, no inputs
    130 interrupted (Ctrl-C); finished outputs are kept, re-running resumes
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, NoReturn

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


def training_progress(bar: Progress, *, label: str = "epoch") -> Callable[[Any], None]:
    """A callback drawing the training loop's events (``cxrtool.train.loop.TrainEvent``) on
    ``bar``: image caching, one bar per epoch with the running loss, then validation."""
    tasks: dict[str, Any] = {}

    def on_event(event: Any) -> None:
        if event.kind == "message":
            bar.console.print(event.message, soft_wrap=True)
        elif event.kind == "cache":
            if "cache" not in tasks:
                tasks["cache"] = bar.add_task("reading images", total=event.steps, status="")
            bar.update(tasks["cache"], completed=event.step)
        elif event.kind == "batch":
            key = f"epoch{event.epoch}"
            if key not in tasks:
                tasks[key] = bar.add_task(f"{label} {event.epoch}/{event.epochs}", total=event.steps, status="")
            bar.update(tasks[key], completed=event.step, status=f"loss {event.loss:.4f}")
        elif event.kind == "epoch" and f"epoch{event.epoch}" in tasks:
            auroc = "n/a" if math.isnan(event.val_auroc) else f"{event.val_auroc:.4f}"
            bar.update(tasks[f"epoch{event.epoch}"],
                       status=f"loss {event.loss:.4f}  val mean AUROC {auroc}  (best {event.best_auroc:.4f})")

    return on_event


@contextmanager
def handle_interrupt():
    """Turn Ctrl-C into exit 130 with a note that finished outputs were kept."""
    try:
        yield
    except KeyboardInterrupt:
        note("[yellow]interrupted:[/] finished outputs are kept; run the same command again to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def run_over_studies(label: str, run: Callable[..., Any], *, jsonl: bool, done_word: str, listed: str) -> NoReturn:
    """Drive ``run(on_result=..., progress=...)`` (predict or explain) with a progress bar,
    failures on stderr as they happen, ``--jsonl`` records on stdout, the summary lines and
    each output folder's ``listed`` file; then exit with the run's status (usage errors
    raised by it, ValueError and CheckpointError, exit 2)."""
    import json
    import sys

    from cxrtool.models.checkpoint import CheckpointError

    bar = progress_bar()
    task = bar.add_task(label, total=None, status="")
    counts = {"predicted": 0, "skipped": 0, "failed": 0}

    def on_result(record: dict) -> None:
        status = record.get("status", "")
        counts[status] = counts.get(status, 0) + 1
        if status == "failed":
            bar.console.print(f"[red]failed[/] {record['path']}: {record['error']}", soft_wrap=True)
        if jsonl:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    def on_progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total,
                   status=f"{counts['predicted']} new, {counts['skipped']} done before, {counts['failed']} failed")

    with handle_interrupt():
        try:
            with bar:
                summary = run(on_result=on_result, progress=on_progress)
        except (CheckpointError, ValueError) as error:
            fail(str(error))
    if summary.total == 0:
        fail("no studies found in the given inputs", EXIT_USAGE)
    note(
        f"[green]{summary.predicted} {done_word}[/], {summary.skipped} already done, "
        f"[{'red' if summary.failed else 'green'}]{len(summary.failed)} failed[/] of {summary.total} studies"
    )
    for folder in summary.folders[:5]:
        note(f"  {folder / listed}")
    if len(summary.folders) > 5:
        note(f"  ... and {len(summary.folders) - 5} more folders")
    if summary.failed:
        warn(f"{len(summary.failed)} studies could not be read; see the error column of cxrtool_predictions.csv")
    raise typer.Exit(summary.exit_code)
