"""The journey ``predict`` and ``explain`` share: find, skip what is done, decode, process, tabulate.

Decoding and preprocessing run in worker processes (a torch DataLoader over the list of
paths; on a Ray cluster with ``engine="ray"``: Ray tasks, :mod:`cxrtool.ray_engine`); the
model runs batched (the run's chunk processor: ``predict``'s scoring,
``explain``'s maps); each study's outcome goes through the run's output stages as soon as
its batch is done (:mod:`cxrtool.stages`: by default its sidecar, then its rows in the
folder's table). Memory stays flat in the number of inputs: only paths and small result
records are kept, never pixels.

Where the model runs: on a GPU, in this process. On a CPU with a worker per core, inside
the workers (each core then does whole studies, and no intra-op threads fight the
decoders); with fewer workers than cores, in this process with the spare cores as threads,
the workers only decoding (:func:`model_in_workers`; ``RunOptions.model_in`` or
``CXRTOOL_MODEL_IN`` choose it). Workers start as every cxrtool worker does
(:mod:`cxrtool._workers`): single-threaded.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool._workers import cores, default_workers, fork_safe_opencv, worker_init
from cxrtool.engines import Engine, EngineReport, engine
from cxrtool.errors import OutputError
from cxrtool.io.decoded import DecodedStudy
from cxrtool.io.dicomweb import CACHE_FOLDER, RemoteStudies
from cxrtool.io.outputs import check_writable, sidecar_path
from cxrtool.io.records import (
    Fingerprint,
    ModelRef,
    RecordError,
    Result,
    Sidecar,
    StudyFailure,
    is_done,
    make_result,
    read_sidecar,
    relative_source,
    sha256_file,
)
from cxrtool.io.studies import StudyReadError, find_studies, one_line, read_study
from cxrtool.models.scoring import Scored, Scorer, ZeroShot
from cxrtool.models.sources import open_model
from cxrtool.preprocess import NO_TTA, Preprocessing, TestTimeAugmentation, prepare
from cxrtool.stages import OutputStage, StudyOutcome, check_folder_table, finish_all, standard_stages

ResultCallback = Callable[[dict[str, Any]], None]
ProgressCallback = Callable[[int, int], None]


@dataclass
class RunSummary:
    """What a run over studies did; ``exit_code`` follows the CLI's convention."""

    total: int = 0
    predicted: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    stale: int = 0  # earlier results dropped because their study's file changed since
    passed: dict[str, int] = field(default_factory=dict)  # files in the folders that are not studies, by why
    # What an output stage could not do for a study whose result stands (a DICOM object not
    # sent to a PACS): (path, one line). Each makes the exit status 1, as a failed study does.
    problems: list[tuple[str, str]] = field(default_factory=list)
    engine: EngineReport = field(default_factory=EngineReport)  # where the studies were decoded and modelled

    @property
    def exit_code(self) -> int:
        if self.total == 0:
            return 2
        return 1 if self.failed or self.problems else 0


PredictSummary = RunSummary  # the name the first release exported


class StudyInputs:
    """Map-style dataset: index -> decoded, preprocessed study (or the reason it failed),
    a :class:`~cxrtool.io.decoded.DecodedStudy`.

    ``preps`` (key -> preprocessing) are what the scorer asks for: each study is decoded once
    and made into one tensor per key (``item.tensors``).
    """

    def __init__(
        self, paths: Sequence[Path], preps: dict[str, Preprocessing], *, include_patient_id: bool = False,
        display_size: int | None = None, views: Sequence[str | None] | None = None,
        fetch: Callable[[Path], None] | None = None,
    ):
        self.paths = paths
        self.fetch = fetch  # brings a study from a server into its cached path first (RemoteStudies.fetch)
        self.preps = preps
        self.views = views  # per path: the projection a table gives, used where the file gives none
        self.include_patient_id = include_patient_id
        self.display_size = display_size  # also hand over the geometry and a uint8 picture this big

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> DecodedStudy:
        path = self.paths[index]
        item = DecodedStudy(index)
        if self.fetch is not None:
            try:
                self.fetch(path)
            except StudyReadError as error:  # (FetchError: the server named, and what it answered)
                item.error = str(error)
                return item
        try:
            item.fingerprint = Fingerprint.of(path)
        except OSError:
            pass  # missing or unreadable: read_study below says which
        try:
            study = read_study(path)
            prepared = {key: prepare(study.pixels, prep) for key, prep in self.preps.items()}
            view, source = study.view_position, ("tag" if study.view_position != "UNKNOWN" else None)
            if source is None and self.views is not None and self.views[index]:
                view, source = self.views[index], "metadata"
            item.tensors = {key: tensor for key, (tensor, _) in prepared.items()}
            item.view_position = view
            item.view_source = source
            item.pixel_spacing = study.pixel_spacing
            item.identity = study.identity
            item.image_size = list(study.shape)
            item.warnings = study.warnings
            if self.display_size:
                item.geometry = {key: geometry for key, (_, geometry) in prepared.items()}
                item.display = _display(study.pixels, self.display_size)
            if self.include_patient_id and study.source_format == "dicom":
                item.patient_id = _patient_id(path)
            if study.pixels.size > _TRIM_ABOVE_PIXELS:
                del study
                _release_freed_memory()
        except StudyReadError as error:
            item.error = str(error)
        except (OSError, ValueError, MemoryError) as error:
            # A decoder failing in a way the readers did not anticipate must not stop the
            # batch: record it as this file's reason.
            item.error = f"{type(error).__name__}: {one_line(str(error)) or type(error).__name__}"
        if item.error is None and item.fingerprint is None:
            item.error = "the file could not be read again to fingerprint its content"  # (changed while read)
        if item.error is not None:  # a study that failed is not scored: nothing of it goes on
            item.tensors = item.geometry = item.display = None
        return item


def _display(pixels: np.ndarray, longest: int) -> np.ndarray:
    """The radiograph as uint8 with its longer side at most ``longest`` pixels, for pictures."""
    import cv2

    height, width = pixels.shape
    ratio = min(1.0, longest / max(height, width))
    if ratio < 1.0:
        pixels = cv2.resize(pixels, (max(1, round(width * ratio)), max(1, round(height * ratio))), interpolation=cv2.INTER_AREA)
    return np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)


# Decoding a large radiograph allocates tens of MB that glibc keeps for the process after
# they are freed; over thousands of studies of mixed sizes the workers' memory would creep.
_TRIM_ABOVE_PIXELS = 2_000_000


def _release_freed_memory() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc (e.g. musl): nothing to trim


def _patient_id(path: Path) -> str:
    import pydicom

    dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
    return str(dataset.get("PatientID", ""))


@dataclass
class RunContext:
    """What a chunk processor needs to turn decoded studies into results (``item.result``),
    and the output stages to place them."""

    scorer: Scorer  # from any model source (cxrtool.models.sources)
    device: Any
    paths: list[Path]  # the studies to do, by dataset index
    folders: list[Path]  # output folder of each study to do, by dataset index
    version: str
    settings: dict[str, Any]  # stage -> settings, recorded with each result
    in_worker: bool = False  # the processor runs inside a decoding worker
    note: Callable[[str], None] | None = None  # what a stage says along the way (the CLI prints it)
    # What a stage could not do for a study whose result stands (path, one line): the
    # run's RunSummary.problems (exit status 1).
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def model(self) -> ModelRef:
        return self.scorer.ref

    def result(self, item: DecodedStudy, scored: Scored) -> Result:
        """The model's result for one study from its scores.

        Raises:
            StudyFailure: a probability that is not a finite number, or a study the scorer
                could not score.
        """
        if scored.failure:
            raise StudyFailure(scored.failure)
        return make_result(self.model, scored.findings, scored.probabilities, scored.thresholds,
                           settings=dict(self.settings), version=self.version, warnings=item.warnings,
                           raw=scored.raw, calibration=scored.calibration, ensemble=scored.ensemble,
                           zero_shot=scored.zero_shot)

    def study_record(self, item: DecodedStudy) -> Sidecar:
        """The study's identity (no results yet) from a decoded item."""
        path, folder = self.paths[item.index], self.folders[item.index]
        spacing = item.pixel_spacing
        return Sidecar(
            file=path.name,
            source=relative_source(path, folder),
            fingerprint=item.fingerprint,
            view_position=item.view_position,
            view_source=item.view_source,
            pixel_spacing_mm=[round(float(v), 6) for v in spacing] if spacing else None,
            image_size=item.image_size,
            identity=dict(item.identity),
            patient_id=item.patient_id,
        )

    def outcome(self, item: DecodedStudy) -> StudyOutcome:
        """A processed study as the output stages take it: its result, or why it failed."""
        path, folder = self.paths[item.index], self.folders[item.index]
        if item.error is not None or item.result is None:
            failure = item.error or "the model gave no result"  # (a processor that dropped it)
            return StudyOutcome(path, folder, "failed", failure=failure, fingerprint=item.fingerprint)
        record = self.study_record(item)
        sidecar = replace(record, results=[item.result])
        return StudyOutcome(path, folder, "predicted", record=record, result=item.result,
                            fingerprint=item.fingerprint, sidecar=sidecar)


ChunkFactory = Callable[[RunContext], Callable[[list[DecodedStudy]], list[DecodedStudy]]]


def output_root(paths: Sequence[Path]) -> Path | None:
    """The folder that ``--out`` mirrors: the common parent of all input folders."""
    if not paths:
        return None
    parents = {str(p.absolute().parent) for p in paths}
    return Path(os.path.commonpath(sorted(parents)))


def regroup(chunks: Iterable[list[DecodedStudy]], size: int) -> Iterator[list[DecodedStudy]]:
    """Regroup the loader's small chunks into model batches of ``size`` (the last may be short)."""
    pending: list[DecodedStudy] = []
    for chunk in chunks:
        pending.extend(chunk)
        if len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads, and give the caller's setting back afterwards."""
    import torch

    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class RunOptions:
    """How a run goes, whatever it does to each study: the flags ``predict``, ``explain``
    and ``models calibrate`` share.

    Attributes:
        out: write into a mirror tree under this folder instead of beside the inputs.
        overwrite: do again studies that are already done.
        batch_size: studies per forward pass.
        workers: decoding processes (default: the CPU count, at most 8; 0 decodes in this
            process). On a CPU with a worker per core they also run the model.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        runtime: ``auto``, ``torch`` or ``onnx`` (:mod:`cxrtool.models.runtime`).
        include_patient_id: add the DICOM PatientID to outputs (off: outputs carry no IDs).
        views: a label or metadata table giving the projection of studies whose files do
            not (:func:`cxrtool.data.labels.read_views`); a bundle routes by it.
        on_result: called with each study's record (done, skipped or failed), in order.
        progress: called with (studies finished, total).
        note: hears what the run says along the way (a one-time export, for one).
        stdin: where ``-`` reads paths from (default: sys.stdin).
        model_in: where the model runs: "auto" (:func:`model_in_workers`), "workers" or
            "main" (this process); the environment's ``CXRTOOL_MODEL_IN`` overrides it (so
            a test or benchmark on two cores can take the path a many-core machine takes).
        cache: where studies read from a DICOMweb server (``dicomweb://...`` inputs,
            :mod:`cxrtool.io.dicomweb`) are cached, and their outputs written beside them
            (default: ``out/dicomweb``; without ``out`` or ``cache`` such inputs are refused).
        engine: where the work is done: "local" (this machine) or "ray" (a Ray cluster,
            :mod:`cxrtool.ray_engine`), or an :class:`~cxrtool.engines.Engine`.
        ray_address: with ``engine="ray"``, the cluster's address ("auto": the one this
            machine's environment names; None: a Ray instance started here for the run).
    """

    out: str | os.PathLike | None = None
    overwrite: bool = False
    batch_size: int = 16
    workers: int | None = None
    device: str = "auto"
    runtime: str = "torch"
    include_patient_id: bool = False
    views: str | os.PathLike | None = None
    on_result: ResultCallback | None = None
    progress: ProgressCallback | None = None
    note: Callable[[str], None] | None = None
    stdin: Any = None
    model_in: str = "auto"
    cache: str | os.PathLike | None = None
    engine: str | Engine = "local"
    ray_address: str | None = None


MODEL_PLACES = ("auto", "workers", "main")


def model_in_workers(wanted: str, device: str, workers: int) -> bool:
    """Whether the model runs inside the decoding workers.

    "auto": on a GPU, never (the model runs here, fed by the workers); on a CPU, when there
    is a worker per core (each core then does whole studies, with no intra-op threads
    fighting the decoders); with fewer workers than cores, here, with the spare cores as
    torch threads. "workers" forces the first path (on a CPU; a GPU model stays here), "main"
    the second. Without workers the model runs here. ``CXRTOOL_MODEL_IN`` overrides ``wanted``.

    Raises:
        UsageError: a place that is not one of :data:`MODEL_PLACES`.
    """
    from cxrtool.errors import UsageError

    wanted = os.environ.get("CXRTOOL_MODEL_IN") or wanted
    if wanted not in MODEL_PLACES:
        raise UsageError(f"the model runs in one of {', '.join(MODEL_PLACES)}, not {wanted!r} (CXRTOOL_MODEL_IN?)")
    if device != "cpu" or workers == 0 or wanted == "main":
        return False
    return wanted == "workers" or workers >= cores()


StageFactory = Callable[[RunContext], Sequence[OutputStage]]


def run_studies(
    inputs: Iterable[str | os.PathLike],
    *,
    model: str | os.PathLike,
    make_processor: ChunkFactory,
    settings: dict[str, Any],
    options: RunOptions | None = None,
    make_stages: StageFactory | None = None,
    done_when: dict[str, Any] | None = None,
    display_size: int | None = None,
    check_model: Callable[[Any], None] | None = None,
    tta: TestTimeAugmentation | None = None,
    zero_shot: ZeroShot | None = None,
    writes: bool = True,
) -> RunSummary:
    """Run a stage (predict, explain) over studies.

    ``make_processor(context)`` gives the callable that turns a chunk of decoded studies
    into results (see :class:`cxrtool.predict.ScoreChunk`); ``make_stages(context)`` the
    output stages each study's outcome goes through, in order, in this process
    (:mod:`cxrtool.stages`; default: the sidecars, then the folder tables). A study whose
    sidecar holds a result of this model made from the same file content with these
    ``settings`` (stage -> settings) is already done (:func:`cxrtool.io.records.is_done`)
    and skipped unless ``options.overwrite``; ``done_when`` narrows that to some stages
    (explain is done when its own stage is, whatever predict's settings were: it builds on
    predict's result). ``model`` is a checkpoint or a bundle file
    (:func:`cxrtool.models.sources.open_model`: any registered model source), or a bundle
    already read; ``check_model(scorer)`` may refuse the request (by raising) before any
    study is looked at. ``display_size``: also decode a picture of each study this big
    (explain's overlays). ``tta`` a :class:`~cxrtool.preprocess.TestTimeAugmentation` the
    model scores with; ``zero_shot`` a :class:`~cxrtool.models.scoring.ZeroShot` of unseen
    findings it adds. ``writes``: the stages write beside the studies (or under
    ``options.out``), so every output folder is checked first (False: they keep what they
    need in memory).

    Raises:
        OutputError: an output folder that cannot be written (before the model loads), or
            an output that could not be written later (the run stops there; what it wrote
            before stays whole).
    """

    from cxrtool import __version__
    from cxrtool.models.network import pick_device
    from cxrtool.models.runtime import choose as choose_runtime

    options = options or RunOptions()
    where = engine(options.engine, options.ray_address)  # refused before any work (Ray not installed...)
    torch_device = pick_device(options.device)
    choose_runtime(options.runtime, torch_device.type)  # an impossible runtime is refused before any file is read
    n_workers = default_workers() if options.workers is None else max(0, options.workers)
    in_workers = model_in_workers(options.model_in, torch_device.type, n_workers)
    table_views = _read_views(options.views)
    passed: dict[str, int] = {}
    out_dir = Path(options.out) if options.out is not None else None
    cache = options.cache if options.cache is not None else (out_dir / CACHE_FOLDER if out_dir is not None else None)
    remote = RemoteStudies(cache)  # DICOMweb inputs: listed here, fetched by the decoding workers
    paths = list(find_studies(inputs, stdin=options.stdin, passed=passed, remote=remote))
    summary = RunSummary(total=len(paths) + len(remote.unlisted), passed=passed)
    root = output_root([path for path in paths if path not in remote])

    def destination(path: Path) -> Path:
        if out_dir is None or path in remote:  # a cached study's outputs go beside it
            return path.parent
        relative = path.absolute().parent.relative_to(root) if root else Path()
        return out_dir / relative

    if writes:  # nowhere to write, or a table that cannot be merged, is said once, before the model loads
        for folder in dict.fromkeys(destination(path) for path in paths):
            check_writable(folder)
            check_folder_table(folder)
    scorer = open_model(model, device=torch_device, runtime=options.runtime, note=options.note, tta=tta or NO_TTA,
                        zero_shot=zero_shot)
    if check_model is not None:
        check_model(scorer)
    model_ref = scorer.ref
    if scorer.routes_by_projection:
        # The table decides routes, so its content (or its absence) is part of what made
        # each result: a run with another table, or none, does the studies again.
        views_digest = sha256_file(options.views) if options.views else None
        settings = {**settings, "predict": {**settings.get("predict", {}), "views": views_digest}}

    finished = 0

    def report(outcome: StudyOutcome) -> None:
        nonlocal finished
        finished += 1
        if options.on_result is not None:
            if outcome.failure is not None:
                record = {"file": outcome.path.name, "path": str(outcome.path), "status": "failed",
                          "error": outcome.failure}
            else:
                sidecar: Sidecar = outcome.sidecar  # type: ignore[assignment]  # a study not failed has one
                record = {**sidecar.flat(outcome.result), "path": str(outcome.path),  # type: ignore[arg-type]
                          "status": outcome.status}
            if outcome.notes:  # what a stage said of the study (the DICOM SR stage: a PNG has no study to add it to)
                record["warnings"] = [*record.get("warnings", []), *outcome.notes]
            options.on_result(record)
        if options.progress is not None:
            options.progress(finished, summary.total)

    context = RunContext(scorer, torch_device, [], [], __version__, settings, in_worker=in_workers, note=options.note)
    stages = list(make_stages(context) if make_stages is not None
                  else standard_stages(model_ref, scorer, __version__))

    def hand_on(outcome: StudyOutcome) -> None:
        for stage in stages:
            stage.study(outcome)
        summary.stale += outcome.stale
        if outcome.failure is not None:
            summary.failed.append((str(outcome.path), outcome.failure))
        elif outcome.status == "skipped":
            summary.skipped += 1
        else:
            summary.predicted += 1
        report(outcome)

    processed: Iterator[DecodedStudy] | None = None
    try:
        for source, reason in remote.unlisted:  # a DICOMweb source whose listing failed: no study to write for
            summary.failed.append((source, reason))
            finished += 1
            if options.on_result is not None:
                options.on_result({"file": source, "path": source, "status": "failed", "error": reason})
            if options.progress is not None:
                options.progress(finished, summary.total)
        for path in paths:
            folder = destination(path)
            previous = None if options.overwrite else read_sidecar(sidecar_path(folder, path.name))
            if previous is not None and is_done(previous.provenance(model_ref.id), inputs={"image": path},
                                                producer=model_ref.sha256,
                                                settings=done_when if done_when is not None else settings):
                hand_on(StudyOutcome(path, folder, "skipped", result=previous.result_for(model_ref.id),
                                     sidecar=previous))  # the table stays complete
            else:
                context.paths.append(path)
                context.folders.append(folder)

        todo = context.paths
        dataset = StudyInputs(todo, scorer.preprocessings, include_patient_id=options.include_patient_id,
                              display_size=display_size,
                              views=[table_views.get(p) for p in todo] if table_views else None,
                              fetch=remote.fetch if remote else None)
        if where.is_local:
            processed = _local_items(dataset, make_processor(context), in_workers=in_workers, workers=n_workers,
                                     batch_size=options.batch_size,
                                     threads=max(1, cores() - n_workers) if torch_device.type == "cpu" and not in_workers
                                     else None)
        else:
            processed = _ray_items(dataset, where, summary.engine, options=options, model=model, tta=tta,
                                   zero_shot=zero_shot, make_processor=make_processor, context=context)
        for item in processed:
            hand_on(context.outcome(item))
            if item.fatal is not None:
                raise OutputError(item.fatal)
    finally:
        if processed is not None:
            processed.close()  # the engine's workers (or cluster session) end before the stages finish
        try:
            summary.folders = finish_all(stages)
        finally:
            summary.problems = list(context.problems)
    return summary


def _local_items(dataset: StudyInputs, processor: Callable[[list[DecodedStudy]], list[DecodedStudy]], *,
                 in_workers: bool, workers: int, batch_size: int, threads: int | None) -> Iterator[DecodedStudy]:
    """The local engine: the studies decoded in ``workers`` processes (a torch DataLoader)
    and processed there (``in_workers``) or here, in order."""
    import torch

    if in_workers:
        # Workers decode and process chunks of a few studies; small chunks keep a run of
        # slow studies (large JPEG 2000 DICOMs) from piling up in one worker.
        chunk, collate = min(batch_size, 8), processor
    else:
        # The model runs here; workers hand over one study at a time and the batches are
        # formed from them as they arrive.
        chunk, collate = 1, _collate
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_chunks(len(dataset), chunk, tail=workers * chunk),
        num_workers=workers,
        collate_fn=collate,
        worker_init_fn=worker_init if workers else None,
        prefetch_factor=max(2, batch_size // chunk) if workers else None,
    )
    with _torch_threads(threads):
        with fork_safe_opencv():
            chunks = iter(loader)  # starts (forks) the workers
        for items in regroup(chunks, batch_size):
            yield from (items if in_workers else processor(items))


def _ray_items(dataset: StudyInputs, where: Engine, report: EngineReport, *, options: RunOptions, model: Any,
               tta: TestTimeAugmentation | None, zero_shot: ZeroShot | None, make_processor: ChunkFactory,
               context: RunContext) -> Iterator[DecodedStudy]:
    """The Ray engine (:mod:`cxrtool.ray_engine`): the same studies, decoded in Ray tasks and
    processed in a pool of model actors, in order."""
    if len(dataset) == 0:
        return  # nothing to do: no cluster to start
    from cxrtool.ray_engine import ModelRecipe, process_studies, ray_session

    report.engine, report.address = where.name, where.address
    recipe = ModelRecipe(model=model, device=options.device, runtime=options.runtime, tta=tta or NO_TTA,
                         zero_shot=zero_shot, make_processor=make_processor, settings=context.settings,
                         version=context.version, folder=os.getcwd())
    with ray_session(where):
        yield from process_studies(dataset, recipe, (list(context.paths), list(context.folders)),
                                   batch_size=options.batch_size, report=report)


def _read_views(table: str | os.PathLike | None):
    """The projections a table gives (:class:`cxrtool.data.labels.ViewTable`; None without a table).

    Raises:
        UsageError: a table that cannot be read, before any study is.
    """
    from cxrtool.data.labels import read_views
    from cxrtool.errors import UsageError

    if table is None:
        return None
    try:
        return read_views(table)
    except (OSError, ValueError) as error:
        raise UsageError(f"--views: {error}") from None


def _chunks(n: int, size: int, *, tail: int) -> list[list[int]]:
    """Indices 0..n-1 in order, in chunks of ``size``, but one by one for the last ``tail``:
    the workers then finish together instead of one of them decoding a last chunk alone."""
    split = max(0, n - tail)
    return [list(range(i, min(i + size, split))) for i in range(0, split, size)] + [[i] for i in range(split, n)]


def _collate(items: list[DecodedStudy]) -> list[DecodedStudy]:
    return items  # batches are stacked by the processor, only from items that decoded


__all__ = [
    "ChunkFactory",
    "DecodedStudy",
    "PredictSummary",
    "ProgressCallback",
    "RecordError",
    "ResultCallback",
    "RunContext",
    "RunOptions",
    "RunSummary",
    "StageFactory",
    "StudyInputs",
    "model_in_workers",
    "output_root",
    "regroup",
    "run_studies",
]
