"""``cxrtool radiomics``: PyRadiomics features of regions of studies, as one table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._console import EXIT_USAGE, fail, handle_interrupt, note, progress_bar, warn


def radiomics(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Studies: files, folders, globs or - (not needed with --masks). "
                                                          "DICOM SEG objects and NAME.mask.png / NAME_mask.nii.gz files among them are masks.")] = None,
    *,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="CSV of image,mask[,label] rows (PyRadiomics' batch format).")] = None,
    from_cam: Annotated[bool, typer.Option("--from-cam", help="Measure the regions `cxrtool explain` wrote for these studies.")] = False,
    positive_only: Annotated[bool, typer.Option("--positive-only", help="With --from-cam: only the findings the model called positive.")] = False,
    params: Annotated[Optional[Path], typer.Option("--params", help="PyRadiomics parameter file (YAML); default: cxrtool's 2D set.")] = None,
    classes: Annotated[Optional[str], typer.Option("--classes", help="Only these feature classes, e.g. firstorder,shape2D,glcm.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output CSV (default: cxrtool_radiomics.csv beside the inputs).")] = None,
    json_too: Annotated[bool, typer.Option("--json", help="Also write the rows as JSON beside the CSV (same name, .json).")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=1, help="Processes (default: all cores).")] = None,
) -> None:
    """Radiomic features per (study, region): from a mask CSV, from explain's CAM regions,
    from masks beside the studies (PNG/NIfTI named NAME.mask.*, or DICOM SEG objects among
    the inputs), or of whole images. One CSV row per region; interrupted runs resume where
    they stopped.

    Exit status: 0 all rows measured, 1 some rows failed (reason in the error column),
    2 usage error (e.g. an invalid parameter file), 130 interrupted.
    """
    from cxrtool.io.studies import find_studies
    from cxrtool.predict import output_root
    from cxrtool.radiomics.batch import run_regions
    from cxrtool.radiomics.features import ParamsError, check_classes, load_params
    from cxrtool.radiomics.sources import jobs_from_cam, jobs_from_csv, jobs_from_studies

    settings = None
    chosen = None
    try:
        if params is not None:
            settings = load_params(params)  # refused before any work, naming the key
        if classes is not None:
            chosen = check_classes([name.strip() for name in classes.split(",") if name.strip()]) or None
    except ParamsError as error:
        fail(str(error))
    if masks is not None:
        if inputs or from_cam or positive_only:
            fail("--masks names the images itself: give no inputs and no --from-cam with it")
        if not masks.is_file():
            fail(f"{masks}: no such mask CSV")
        try:
            jobs = jobs_from_csv(masks)
        except ValueError as error:
            fail(str(error))
        default_folder = masks.parent
    else:
        if not inputs:
            fail("give studies (with --from-cam for explain's regions), or --masks CSV")
        studies = list(find_studies(inputs))
        if positive_only and not from_cam:
            fail("--positive-only goes with --from-cam")
        if from_cam:
            jobs, unexplained = jobs_from_cam(studies, positive_only=positive_only)
            if unexplained:
                warn(f"{len(unexplained)} studies have no explanations (run cxrtool explain first), e.g. {unexplained[0]}")
        else:
            jobs, counts = jobs_from_studies(studies)
            if counts["seg"] or counts["beside"]:
                note(f"{counts['seg']} regions from DICOM SEG, {counts['beside']} from masks beside the studies, "
                     f"{counts['whole']} whole images")
            if counts["unmatched_seg"]:
                warn(f"{counts['unmatched_seg']} DICOM SEG objects reference none of the input images (give the images too) or cannot be read")
        root = output_root(studies) or Path.cwd()
        default_folder = Path(os.path.relpath(root)) if root.is_relative_to(Path.cwd()) else root
    if not jobs:
        fail("no regions to measure", EXIT_USAGE)
    table = out or default_folder / "cxrtool_radiomics.csv"
    bar = progress_bar()
    task = bar.add_task("radiomics", total=len(jobs), status="")
    with handle_interrupt(), bar:
        summary = run_regions(jobs, table, params=settings, classes=chosen, workers=workers or os.cpu_count() or 1,
                              progress=lambda done, total: bar.update(task, completed=done, total=total),
                              json_out=table.with_suffix(".json") if json_too else None)
    if summary.restarted:
        warn(f"{summary.table}: the earlier run there used other settings; measured afresh")
    note(f"[green]{summary.measured} regions measured[/], {summary.resumed} from an earlier run, "
         f"[{'red' if summary.failed else 'green'}]{len(summary.failed)} failed[/] of {summary.total}")
    note(f"  {summary.table}" + (f"\n  {summary.json}" if summary.json else ""))
    if summary.failed:
        warn(f"{len(summary.failed)} regions could not be measured, e.g. {summary.failed[0][0]}: {summary.failed[0][1]}")
    raise typer.Exit(summary.exit_code)
