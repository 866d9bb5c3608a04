"""Output stages: what a run does with each study once the model is done with it.

A run (:func:`cxrtool.runner.run_studies`) decodes studies, has its chunk processor score
(``predict``) or map (``explain``) them where the model runs, and hands every study's
outcome, in order, to its output stages in the main process, then calls each stage's
``finish`` once. A stage is anything with those two methods (:class:`OutputStage`):

- :class:`SidecarStage` merges the result into the study's sidecar (and, for a study that
  failed, drops what its failure makes stale); it gives the later stages the sidecar as
  stored, every model's results in it;
- :class:`FolderTableStage` keeps each folder's table and index;
- ``explain`` adds its contact sheets (:class:`cxrtool.explain.run.ContactSheets`);
- ``models calibrate`` keeps scores in memory instead of writing anything
  (:mod:`cxrtool.bundle_calibration`).

Further stages are named: a module in :data:`OUTPUT_STAGE_MODULES` defines ``STAGE``, an
:class:`OutputKind` (its name, what it writes, and ``make(context)``, the stage for a run);
``predict(..., outputs=["name"])`` and ``explain(..., outputs=[...])`` put them before the
standard ones (:func:`extra_stages`).

Files beside a study belong to the result that lists them (:meth:`Result.files`): storing a
result removes the files its predecessor listed and it does not, and a stale result takes
its files with it. That is the one rule for stale files: a stage that writes files beside a
study lists them in ``outcome.result.outputs[its name]`` (:meth:`StudyOutcome.wrote`) before
the sidecar stage stores the result.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from cxrtool.io.outputs import FOLDER_CSV, output_stem, owned_by, refuse_link
from cxrtool.io.records import (
    FolderOutputs,
    ModelRef,
    Result,
    Sidecar,
    index_entry,
    read_table_rows,
    settle_failure,
    store_result,
)
from cxrtool.io.records.provenance import Fingerprint


@dataclass
class StudyOutcome:
    """One study at the end of its run, as the output stages see it (in order of the stages).

    Attributes:
        path: the study's file.
        folder: where its outputs go (beside it, or its ``--out`` mirror).
        status: "predicted" (this run made ``result``), "skipped" (already done: ``result``
            is the stored one) or "failed" (``failure`` says why).
        record: the study's identity (file, source, fingerprint, view, spacing...), no
            results; None for a study that failed.
        result: this model's result; None for a study that failed.
        failure: why it failed (one line), or None.
        fingerprint: its file's content as read (None when it could not be read).
        sidecar: the study's sidecar: as stored once a :class:`SidecarStage` has run
            (every model's results), else this run's record with its one result; None for
            a failed study without one.
        stale: how many earlier results of the study were dropped because its file changed.
    """

    path: Path
    folder: Path
    status: Literal["predicted", "skipped", "failed"]
    record: Sidecar | None = None
    result: Result | None = None
    failure: str | None = None
    fingerprint: Fingerprint | None = None
    sidecar: Sidecar | None = None
    stale: int = 0
    relisted: bool = False  # a stage listed files in the result: a skipped study's sidecar is stored again
    notes: list[str] = field(default_factory=list)  # what a stage says of the study, a line each: its record's warnings

    def output_name(self, kind: str) -> str:
        """The name of a file of this model's result beside the study:
        ``NAME.cxrtool.<model id>.<kind>`` (a long NAME shortened: :func:`~cxrtool.io.outputs.output_stem`)."""
        model = self.result.model.id if self.result is not None else "failed"
        return f"{output_stem(self.path.name)}.cxrtool.{model}.{kind}"

    def wrote(self, stage: str, names: Sequence[str]) -> None:
        """Record files a stage wrote in the study's output folder for this result, so the
        result lists them (and they go when it is replaced without them, or goes stale)."""
        if self.result is None:
            raise ValueError(f"{self.path.name}: no result to list {stage}'s files in (the study failed)")
        for name in names:
            if not owned_by(name, self.path.name):
                raise ValueError(f"{stage} wrote {name!r}: a study's files are named "
                                 f"{output_stem(self.path.name)}.cxrtool.* (io.outputs.output_stem), in its output folder")
        self.result.outputs[stage] = list(names)
        self.relisted = True


class OutputStage(Protocol):
    """A thing a run does with each study's outcome, in the main process."""

    def study(self, outcome: StudyOutcome) -> None:
        """Take one study's outcome (every study of the run, done, skipped or failed, in order)."""

    def finish(self) -> list[Path]:
        """The run is over (or stopped): write what is left; the output folders written to."""


class SidecarStage:
    """Merge each result into its study's sidecar; a study that failed loses what its
    failure makes stale (:func:`cxrtool.io.records.settle_failure`).

    ``keep(previous, new)`` may carry parts of the model's previous result of the same
    content over (``predict`` keeps explain's maps of the same probabilities).
    """

    def __init__(self, model: ModelRef, *, keep: Callable[[Result, Result], Result] | None = None) -> None:
        self.model = model
        self.keep = keep

    def study(self, outcome: StudyOutcome) -> None:
        if outcome.status == "skipped" and not outcome.relisted:
            return  # the stored sidecar is the outcome's already
        if outcome.status == "skipped":  # already done, but a stage wrote files for its stored result
            update = store_result(outcome.folder, outcome.sidecar, outcome.result)  # type: ignore[arg-type]
            outcome.sidecar = update.sidecar
            return
        if outcome.status == "failed" or outcome.record is None or outcome.result is None:
            update = settle_failure(outcome.folder, outcome.path, outcome.fingerprint, self.model.id)
        else:
            update = store_result(outcome.folder, outcome.record, outcome.result, keep=self.keep)
            outcome.result = update.sidecar.result_for(self.model.id) if update.sidecar else outcome.result
        outcome.sidecar, outcome.stale = update.sidecar, outcome.stale + len(update.stale)

    def finish(self) -> list[Path]:
        return []


class FolderTableStage:
    """Each output folder's table (one row per study and model) and index (each model's
    findings and thresholds): :class:`cxrtool.io.records.FolderOutputs`."""

    def __init__(self, model: ModelRef, scorer: Any, version: str) -> None:
        self.outputs = FolderOutputs(model, index_entry(model, scorer, scorer.thresholds, version))

    def study(self, outcome: StudyOutcome) -> None:
        self.outputs.study(outcome.folder, outcome.path.name, outcome.sidecar, failure=outcome.failure,
                           stale=bool(outcome.stale))

    def finish(self) -> list[Path]:
        return self.outputs.finish()


def check_folder_table(folder: Path) -> None:
    """Read a folder's table before a run writes into it, so one that cannot be merged (no
    longer UTF-8, a link) is refused before any work, not after the scoring.

    Raises:
        UsageError: a table that cannot be read; OutputError: a table that is a link.
    """
    table = folder / FOLDER_CSV
    refuse_link(table)
    if table.is_file():
        read_table_rows(table)


def standard_stages(model: ModelRef, scorer: Any, version: str, *,
                    keep: Callable[[Result, Result], Result] | None = None) -> list[OutputStage]:
    """What ``predict`` and ``explain`` write: the sidecars, then the folder tables."""
    return [SidecarStage(model, keep=keep), FolderTableStage(model, scorer, version)]


@dataclass(frozen=True)
class OutputKind:
    """A named output stage: ``make(context)`` gives the stage for one run (``context``: the
    run's :class:`cxrtool.runner.RunContext`: its scorer, settings, version)."""

    name: str
    description: str
    make: Callable[[Any], OutputStage]


# Modules that each define STAGE, an OutputKind (imported when asked for, so a stage's
# dependencies load only for runs that use it).
OUTPUT_STAGE_MODULES: tuple[str, ...] = ("cxrtool.reports.sr", "cxrtool.reports.seg", "cxrtool.reports.store")


def output_kinds() -> dict[str, OutputKind]:
    """Every named output stage, by name."""
    found = [importlib.import_module(name).STAGE for name in OUTPUT_STAGE_MODULES]
    return {kind.name: kind for kind in found}


def extra_stages(context: Any, wanted: Sequence[str | OutputKind]) -> list[OutputStage]:
    """The stages a run adds after the standard ones: registered names, or kinds not
    registered (a script's own).

    Raises:
        UsageError: a name that is not registered (the registered ones are listed).
    """
    from cxrtool.errors import UsageError

    kinds = output_kinds() if any(isinstance(item, str) for item in wanted) else {}
    stages = []
    for item in wanted:
        if isinstance(item, str):
            if item not in kinds:
                known = ", ".join(kinds) or "none"
                raise UsageError(f"no output stage {item!r}; the registered ones: {known}")
            item = kinds[item]
        stages.append(item.make(context))
    return stages


def finish_all(stages: Sequence[OutputStage]) -> list[Path]:
    """Finish every stage (each one, even when one before it fails: a table is never lost to
    a contact sheet); the folders any of them wrote, sorted."""
    folders: set[Path] = set()
    failure: BaseException | None = None
    for stage in stages:
        try:
            folders.update(stage.finish())
        except BaseException as error:  # noqa: BLE001 - re-raised once the others have finished
            failure = failure or error
    if failure is not None:
        raise failure
    return sorted(folders)


__all__ = ["OUTPUT_STAGE_MODULES", "FolderTableStage", "OutputKind", "OutputStage", "SidecarStage", "StudyOutcome",
           "extra_stages", "finish_all", "output_kinds", "standard_stages"]
