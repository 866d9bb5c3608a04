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
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# -j, one meaning everywhere (cxrtool._workers): worker processes, 0 for none.
Workers = Annotated[int | None, typer.Option(
    "--workers", "-j", min=0, help="Worker processes (0: none, all in this process; default: a worker per core, "
    "at most 8, all cores for radiomics).")]

# The PACS side of predict and explain (and radiomics' SR), one definition each.
StoreTo = Annotated[str | None, typer.Option(
    "--store-to", help="Send each study's DICOM objects (--dicom) to a PACS after they are written: "
    "dicomweb://HOST:PORT/PATH (STOW-RS; dicomwebs:// for https) or dicom://AET@HOST:PORT (C-STORE). What was "
    "sent is recorded in each folder's cxrtool_sent.json and not sent again; what failed is retried by the next run.")]
AeTitle = Annotated[str, typer.Option("--ae-title", envvar="CXRTOOL_AE_TITLE",
                                      help="The calling AE title of --store-to dicom://...")]
DicomwebCache = Annotated[Path | None, typer.Option(
    "--cache", help="Where studies read from a DICOMweb server are cached, CACHE/<server>/<study UID>/<instance "
    "UID>.dcm, their outputs beside them (default: OUT/dicomweb under --out). A study done before by this model "
    "is not fetched again.")]
# Where the work is done (cxrtool.engines), one definition for predict, explain and radiomics.
EngineOption = Annotated[str, typer.Option(
    "--engine", help="local (this machine) or ray (a Ray cluster: decoding and measuring in Ray tasks, a model "
    "in an actor pool; needs the ray extra of cxrtool). The files written are the same; a run resumes under "
    "either.")]
RayAddress = Annotated[str | None, typer.Option(
    "--ray-address", envvar="CXRTOOL_RAY_ADDRESS", help="With --engine ray: the cluster (auto: the one this "
    "machine's environment names, as `ray start` left it; HOST:PORT; default: a Ray instance started here "
    "for the run).")]
DICOMWEB_INPUTS = ("Files, folders (recursive), globs, - to read paths from stdin, or studies on a DICOMweb server: "
                   "dicomweb://HOST:PORT/PATH/studies/STUDY_UID (or .../series/UID, or a query "
                   ".../studies?PatientID=ID; dicomwebs:// for https), fetched into --cache.")

EXIT_OK = 0
EXIT_PARTIAL = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def one_of(choices: Iterable[str]) -> Callable[[Any], Any]:
    """A typer option callback accepting only ``choices`` (names from the registry)."""
    allowed = list(choices)

    def check(value: Any) -> Any:
        if value is not None and value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}")
        return value

    return check


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print a one-line error on stderr and exit with ``code``."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def note(message: str) -> None:
    err.print(message, soft_wrap=True)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def dicom_outputs(value: str | None, *, maps: bool = False, store_to: str | None = None,
                  ae_title: str = "CXRTOOL") -> list[Any]:
    """The output stages ``--dicom`` names (comma-separated), checked before any work: an
    unknown one is a usage error (exit 2) listing the registered ones, and so is one made
    from explain's maps (seg) where the run makes none (``maps`` False: predict). Only the
    stages' modules load here (each imports its own dependencies when a run makes it).
    With ``--store-to``, the store stage last (it sends what the others wrote), its
    destination checked now."""
    wanted: list[Any] = _dicom_names(value, maps=maps)
    if store_to is not None:
        from cxrtool.errors import UsageError
        from cxrtool.reports.store import store_to as store_stage

        if not wanted:
            fail("--store-to sends the DICOM objects the run writes: name them with --dicom (e.g. --dicom sr)")
        try:
            wanted.append(store_stage(store_to, ae_title=ae_title))
        except UsageError as error:
            fail(str(error))
    return wanted


def _dicom_names(value: str | None, *, maps: bool) -> list[Any]:
    if value is None:
        return []
    from cxrtool.stages import output_kinds

    wanted = list(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    known = {name: kind for name, kind in output_kinds().items() if name != "store"}  # it sends them: --store-to
    unknown = [name for name in wanted if name not in known]
    registered = ", ".join(known) or "none"
    if not wanted:
        fail(f"--dicom: name the DICOM outputs to write (comma-separated); the registered ones: {registered}")
    if unknown:
        fail(f"--dicom: no DICOM output {', '.join(repr(name) for name in unknown)}; the registered ones: {registered}")
    if not maps and "seg" in wanted:
        from cxrtool.reports.seg import NEEDS_MAPS

        fail(NEEDS_MAPS)
    return wanted


def progress_bar(*, transient: bool = False) -> Any:
    """Progress on stderr: a live rich bar on a terminal; under a pipe, CI or a batch
    scheduler, a plain line now and then (what, how far, rate, time left) instead."""
    disabled = os.environ.get("CXRTOOL_NO_PROGRESS") == "1"
    if not err.is_terminal:
        return PlainProgress(err, disabled=disabled)
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
        disable=disabled,
    )


@dataclass
class _PlainTask:
    description: str
    total: float | None
    status: str = ""
    completed: float = 0.0
    started: float = field(default_factory=time.monotonic)
    printed: float = field(default_factory=time.monotonic)
    done: bool = False
    first: tuple[float, float] | None = None  # (time, count) of the first progress: after the start-up

    def rate(self, now: float) -> float | None:
        """Items a second since the first ones finished, so that a slow start (loading a
        model, exporting a graph) does not make the time left hours; none before that.
        Once done, the whole run's rate."""
        if self.done:
            return self.completed / (now - self.started) if now > self.started else None
        if self.first is not None and self.completed > self.first[1] and now > self.first[0]:
            return (self.completed - self.first[1]) / (now - self.first[0])
        return None


class PlainProgress:
    """Progress for logs: the subset of rich's ``Progress`` the CLI uses, printing a plain
    line per task every ``interval`` seconds (``CXRTOOL_PROGRESS_INTERVAL``, default 30)
    and when it completes, e.g. ``predict: 120/300 (40%), 12.3/s, 0:00:15 left``."""

    def __init__(self, console: Console, *, interval: float | None = None, disabled: bool = False) -> None:
        self.console = console
        self.interval = interval if interval is not None else float(os.environ.get("CXRTOOL_PROGRESS_INTERVAL", "30"))
        self.disabled = disabled
        self.tasks: dict[int, _PlainTask] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        for task in self.tasks.values():
            if not task.done and task.completed and exc[0] is None:
                self._line(task)

    def add_task(self, description: str, total: float | None = None, status: str = "", **_: Any) -> int:
        key = len(self.tasks)
        self.tasks[key] = _PlainTask(description, total, status)
        return key

    def update(self, key: int, *, completed: float | None = None, total: float | None = None,
               advance: float | None = None, status: str | None = None, **_: Any) -> None:
        task = self.tasks[key]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if status is not None:
            task.status = status
        if task.first is None and task.completed:
            task.first = (time.monotonic(), task.completed)
        finished = task.total is not None and task.completed >= task.total
        if finished and not task.done:
            task.done = True
            self._line(task)
        elif not finished and time.monotonic() - task.printed >= self.interval:
            self._line(task)

    def _line(self, task: _PlainTask) -> None:
        task.printed = now = time.monotonic()
        if self.disabled:
            return
        rate = task.rate(now)
        parts = [f"{task.completed:g}/{task.total:g} ({100 * task.completed / task.total:.0f}%)"
                 if task.total else f"{task.completed:g}"]
        if task.status:
            parts.append(task.status)
        if rate is not None:
            parts.append(f"{rate:,.0f}/s" if rate >= 100 else f"{rate:.3g}/s" if rate >= 0.1 else f"{1 / rate:.3g} s each")
        if task.done:
            parts.append(f"done in {_clock(now - task.started)}")
        elif task.total and rate:
            parts.append(f"{_clock((task.total - task.completed) / rate)} left")
        self.console.print(f"{task.description}: {', '.join(parts)}", soft_wrap=True, markup=False)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def show(renderable: Any, console: Console | None = None) -> None:
    """Print a table (or any renderable) at its natural width: never squeezed or cut to
    the terminal's (or, in a log, rich's default 80) columns."""
    console = console or out
    needed = Measurement.get(console, console.options.update_width(1_000_000), renderable).maximum
    if needed <= console.width:
        console.print(renderable)
        return
    wide = Console(file=console.file, width=needed, force_terminal=console.is_terminal, no_color=console.no_color,
                   highlight=False)
    wide.print(renderable)


def training_progress(bar: Any, *, label: str = "epoch") -> Callable[[Any], None]:
    """A callback drawing the training loop's events (``cxrtool.train.loop.TrainEvent``) on
    ``bar``: image caching, named phases (a feedback cycle's maps and radiomics), one bar per
    epoch with the running loss, then validation. Under
    a log (no terminal) each epoch's summary is also a line of its own."""
    tasks: dict[str, Any] = {}
    plain = isinstance(bar, PlainProgress)

    def on_event(event: Any) -> None:
        if event.kind == "message":
            bar.console.print(event.message, soft_wrap=True)
        elif event.kind == "cache":
            if "cache" not in tasks:
                tasks["cache"] = bar.add_task("reading images", total=event.steps, status="")
            bar.update(tasks["cache"], completed=event.step)
        elif event.kind == "phase":
            key = f"phase:{event.message}"
            if key not in tasks:
                tasks[key] = bar.add_task(event.message, total=event.steps, status="")
            bar.update(tasks[key], completed=event.step)
        elif event.kind == "batch":
            key = f"epoch{event.epoch}"
            if key not in tasks:
                tasks[key] = bar.add_task(f"{label} {event.epoch}/{event.epochs}", total=event.steps, status="")
            bar.update(tasks[key], completed=event.step, status=f"loss {event.loss:.4f}")
        elif event.kind == "epoch":
            auroc = "n/a" if math.isnan(event.val_auroc) else f"{event.val_auroc:.4f}"
            summary = f"loss {event.loss:.4f}  val mean AUROC {auroc}  (best {event.best_auroc:.4f})"
            if plain:
                bar.console.print(f"{label} {event.epoch}/{event.epochs}: {summary}", soft_wrap=True, markup=False)
            elif f"epoch{event.epoch}" in tasks:
                bar.update(tasks[f"epoch{event.epoch}"], status=summary)

    return on_event


@contextmanager
def handle_interrupt(resume: str = "run the same command again to resume"):
    """Turn Ctrl-C into exit 130 with a note that finished outputs were kept, and how to
    go on (``resume``: a command run with --overwrite resumes without it)."""
    try:
        yield
    except KeyboardInterrupt:
        note(f"[yellow]interrupted:[/] finished outputs are kept; {resume}")
        raise typer.Exit(EXIT_INTERRUPTED) from None


RESUME_WITHOUT_OVERWRITE = "run the same command without --overwrite to resume"


def run_over_studies(label: str, run: Callable[..., Any], *, jsonl: bool, done_word: str, listed: str,
                     overwrite: bool = False) -> NoReturn:
    """Drive ``run(on_result=..., progress=...)`` (predict or explain) with a progress bar,
    failures on stderr as they happen, ``--jsonl`` records on stdout, the summary lines and
    each output folder's ``listed`` file; then exit with the run's status (usage errors
    raised by it, and unusable checkpoints or records, exit 2)."""
    import json
    import sys

    from cxrtool.errors import UsageError
    from cxrtool.io.records import RecordError
    from cxrtool.models.checkpoint import CheckpointError

    bar = progress_bar()
    task = bar.add_task(label, total=None, status="")
    counts = {"predicted": 0, "skipped": 0, "failed": 0}

    def on_result(record: dict) -> None:
        status = record.get("status", "")
        counts[status] = counts.get(status, 0) + 1
        if status == "failed":
            bar.console.print(f"[red]failed[/] {escape(record['path'])}: {escape(record['error'])}", soft_wrap=True)
        for warning in record.get("warnings", ()) if status == "predicted" else ():
            bar.console.print(f"[yellow]warning:[/] {escape(record['path'])}: {escape(warning)}", soft_wrap=True)
        if jsonl:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    def on_progress(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total,
                   status=f"{counts['predicted']} new, {counts['skipped']} done before, {counts['failed']} failed")

    def on_note(message: str) -> None:
        bar.console.print(escape(message), soft_wrap=True)

    with handle_interrupt(RESUME_WITHOUT_OVERWRITE if overwrite else "run the same command again to resume"):
        try:
            with bar:
                summary = run(on_result=on_result, progress=on_progress, note=on_note)
        except (CheckpointError, UsageError, RecordError) as error:
            fail(str(error))
    if summary.total == 0:
        fail("no studies found in the given inputs", EXIT_USAGE)
    note(
        f"[green]{summary.predicted} {done_word}[/], {summary.skipped} already done, "
        f"[{'red' if summary.failed else 'green'}]{len(summary.failed)} failed[/] of {summary.total} studies"
    )
    if summary.stale:
        count = f"{summary.stale} earlier {'result' if summary.stale == 1 else 'results'}"
        note(f"{count} of studies whose files have changed since removed (they described the old files), "
             "with their pictures")
    if summary.engine.engine != "local" and (summary.engine.decoded_on or summary.engine.modelled_on):
        note(summary.engine.line())
    if summary.passed:  # what the folders held besides studies, and by which rule it was passed over
        note("passed over in the folders: " + ", ".join(f"{count} {why}" for why, count in sorted(summary.passed.items()))
             + " (a study is any DICOM, PNG or JPEG not named *.cxrtool.json or *.cxrtool.<model id>.*)")
    for folder in summary.folders[:5]:
        note(f"  {folder / listed}")
    if len(summary.folders) > 5:
        note(f"  ... and {len(summary.folders) - 5} more folders")
    if summary.failed:
        count = f"{len(summary.failed)} {'study' if len(summary.failed) == 1 else 'studies'}"
        warn(f"{count} could not be read or scored; see the error column of cxrtool_predictions.csv")
    raise typer.Exit(summary.exit_code)
