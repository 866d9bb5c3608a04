"""The Python API behind ``cxrtool radiomics``: regions of studies -> one feature table.

Where the regions come from is the caller's choice, as on the command line: a mask CSV
(PyRadiomics' batch format), the regions ``explain`` wrote (``from_cam``), or the studies
themselves (DICOM SEG objects among them, ``NAME.mask.*`` beside them, else the whole
image). The measuring, journaling and table writing is :func:`cxrtool.radiomics.batch.run_regions`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cxrtool.errors import UsageError
from cxrtool.radiomics.batch import RadiomicsSummary, run_regions

TABLE_NAME = "cxrtool_radiomics.csv"


def radiomics(
    inputs: Iterable[str | os.PathLike] | None = None,
    *,
    masks: str | os.PathLike | None = None,
    from_cam: bool = False,
    explanations: str | os.PathLike | None = None,
    positive_only: bool = False,
    model: str | None = None,
    include_off_chest: bool = False,
    params: str | os.PathLike | dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    json_too: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    note: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    dicom: Sequence[str] = (),
    store_to: str | None = None,
    ae_title: str = "CXRTOOL",
    engine: str = "local",
    ray_address: str | None = None,
) -> RadiomicsSummary:
    """PyRadiomics features per (study, region), as one CSV (and JSON) table; an
    interrupted run resumes where it stopped.

    Args:
        inputs: studies (files, folders, globs); not needed with ``masks`` or ``explanations``.
        masks: a CSV of image,mask[,label] rows; names the images itself.
        from_cam: measure the regions ``cxrtool explain`` wrote for the studies.
        explanations: the folder explain wrote (its ``--out``); implies ``from_cam``.
        positive_only: with ``from_cam``, only the findings the model called positive.
        model: with ``from_cam``, only this model's maps (its name or id).
        include_off_chest: with ``from_cam``, also the regions off the chest (left out by
            default, with a count).
        params: a PyRadiomics parameter file (YAML) or its settings; default: cxrtool's 2D set.
        classes: only these feature classes.
        out: the table (default ``cxrtool_radiomics.csv`` beside the inputs).
        json_too: also the rows as JSON beside the table.
        workers: worker processes (default: a worker per core; 0: in this process).
        overwrite: measure everything again; replaces a table measured with other settings.
        progress: called with (regions done, total).
        note, warn: what the run says along the way (counts of regions by source, regions
            left out and why).
        dicom: DICOM objects to write too: ``["sr"]``, a Structured Report of each DICOM
            image's regions and their features (:mod:`cxrtool.reports.radiomics_sr`).
        store_to: send those objects to a PACS (``dicomweb://...`` or ``dicom://AET@HOST:PORT``,
            :mod:`cxrtool.reports.store`; calling AE title ``ae_title``), recorded in each
            folder's ``cxrtool_sent.json``.
        engine: "local" (``workers`` processes here) or "ray" (Ray tasks on the cluster at
            ``ray_address``: :mod:`cxrtool.ray_engine`); the table is the same.

    Returns:
        A :class:`~cxrtool.radiomics.batch.RadiomicsSummary` (``exit_code`` 1 when a row failed).

    Raises:
        UsageError: a request that cannot be served (an invalid parameter file, no regions,
            a table measured with other settings), before or instead of any work.

    Example:
        >>> summary = radiomics(["study/"], from_cam=True, positive_only=True)
        >>> summary.measured, summary.table
    """
    from cxrtool.io.studies import find_studies
    from cxrtool.radiomics.features import ParamsError, check_classes, load_params
    from cxrtool.radiomics.sources import jobs_from_cam, jobs_from_csv, jobs_from_studies
    from cxrtool.runner import output_root

    say = note or (lambda message: None)
    caution = warn or say
    target = _dicom_outputs(dicom, store_to, ae_title)  # refused before any work
    from cxrtool.engines import engine as check_engine

    check_engine(engine, ray_address)  # (so is an engine that cannot run here)
    try:
        settings = load_params(params) if isinstance(params, str | os.PathLike) else params  # refused before any work
        chosen = check_classes(list(classes)) or None if classes else None
    except ParamsError as error:
        raise UsageError(str(error)) from None
    from_cam = from_cam or explanations is not None
    explanations = Path(explanations) if explanations is not None else None
    inputs = list(inputs or [])
    if explanations is not None and not explanations.is_dir():
        raise UsageError(f"{explanations}: no such folder (give the folder cxrtool explain wrote with --out)")
    studies: list[Path] = []
    if masks is not None:
        masks = Path(masks)
        if inputs or from_cam or positive_only:
            raise UsageError("--masks names the images itself: give no inputs and no --from-cam with it")
        if not masks.is_file():
            raise UsageError(f"{masks}: no such mask CSV")
        try:
            jobs = jobs_from_csv(masks)
        except ValueError as error:
            raise UsageError(str(error)) from None
        default_folder = masks.parent
    else:
        if not inputs and explanations is None:
            raise UsageError("give studies (with --from-cam for explain's regions), --explanations DIR, or --masks CSV")
        studies = list(find_studies(inputs))
        if (positive_only or model or include_off_chest) and not from_cam:
            raise UsageError("--positive-only, --model and --include-off-chest go with --from-cam")
        if from_cam:
            jobs, unexplained, skipped = jobs_from_cam(studies, positive_only=positive_only, explanations=explanations,
                                                       model=model, include_off_chest=include_off_chest)
            if skipped:
                reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
                left_out = (f"{sum(skipped.values())} CAM regions left out as not evidence on the chest ({reasons}); "
                            "--include-off-chest measures them too")
                if not jobs:
                    raise UsageError(f"no regions to measure: {left_out}")
                say(left_out)
            if unexplained:
                caution(f"{len(unexplained)} studies have no explanations (run cxrtool explain first, and give its --out "
                        f"folder with --explanations), or changed since they were explained, e.g. {unexplained[0]}")
        else:
            jobs, counts = jobs_from_studies(studies)
            if counts["seg"] or counts["beside"]:
                say(f"{counts['seg']} regions from DICOM SEG, {counts['beside']} from masks beside the studies, "
                    f"{counts['whole']} whole images")
            if counts["unmatched_seg"]:
                caution(f"{counts['unmatched_seg']} DICOM SEG objects reference none of the input images (give the images "
                        "too) or cannot be read")
        root = output_root(studies) or (explanations.absolute() if explanations is not None else Path.cwd())
        default_folder = Path(os.path.relpath(root)) if root.is_relative_to(Path.cwd()) else root
    if not jobs:
        if from_cam and explanations is None and not studies:
            raise UsageError("no studies in the inputs (the folder explain wrote with --out holds its outputs, not the "
                             "studies: give it as --explanations DIR)")
        raise UsageError("no regions to measure")
    table = Path(out) if out is not None else default_folder / TABLE_NAME
    summary = run_regions(jobs, table, params=settings, classes=chosen, workers=workers,
                          progress=progress, json_out=table.with_suffix(".json") if json_too else None, overwrite=overwrite,
                          engine_name=engine, ray_address=ray_address)
    if dicom:
        summary.reports = _write_dicom(summary, target, say)
    return summary


def _dicom_outputs(dicom: Sequence[str], store_to: str | None, ae_title: str) -> Any:
    """Check ``dicom`` and ``store_to`` before any work; the destination (or None).

    Raises:
        UsageError: an output radiomics does not write, highdicom missing, a destination of no
            known form, or ``store_to`` without ``dicom``.
    """
    unknown = [name for name in dicom if name != "sr"]
    if unknown:
        raise UsageError(f"--dicom: radiomics writes sr (a Structured Report of each DICOM image's regions), "
                         f"not {', '.join(map(repr, unknown))}")
    if store_to is not None and not dicom:
        raise UsageError("--store-to sends the DICOM objects the run writes: name them with --dicom sr")
    if dicom:
        from cxrtool.reports._dicom import require_highdicom

        require_highdicom("the DICOM SR (--dicom sr)")
    if store_to is None:
        return None
    from cxrtool.reports.store import destination

    return destination(store_to, ae_title=ae_title)


def _write_dicom(summary: RadiomicsSummary, target: Any, say: Callable[[str], None]) -> Any:
    """The SRs of the table's rows, and their sending to ``target``; failures said per image
    and kept in ``summary.dicom_problems`` (exit status 1)."""
    from types import SimpleNamespace

    from cxrtool.reports.radiomics_sr import write_reports
    from cxrtool.reports.store import StoreStage

    reports = write_reports(summary.rows)
    parts = [f"{len(reports.written)} written", f"{len(reports.current)} up to date"]
    if reports.removed:
        parts.append(f"{len(reports.removed)} removed (their regions can no longer be measured)")
    if reports.not_dicom:
        parts.append(f"{reports.not_dicom} regions of PNG/JPEG images have none (no DICOM study)")
    say("DICOM SR of the regions: " + ", ".join(parts))
    for image, reason in reports.problems:
        summary.dicom_problems.append((image, reason))
        say(f"{reason}: {image}")
    if target is not None:
        context = SimpleNamespace(note=say, problems=[])
        stage = StoreStage(context, target)
        try:
            for path in reports.files:
                stage.send_files(path.parent, path.name.split(".cxrtool.", 1)[0], [path.name], where=str(path))
        finally:
            stage.finish()
        summary.dicom_problems.extend(context.problems)
    return reports


__all__ = ["TABLE_NAME", "radiomics"]
