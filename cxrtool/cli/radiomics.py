"""``cxrtool radiomics``: PyRadiomics features of regions of studies, as one table."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cxrtool.cli._console import EXIT_USAGE, fail, handle_interrupt, note, progress_bar, warn


def radiomics(
    inputs: Annotated[list[str] | None, typer.Argument(help="Studies: files, folders, globs or - (not needed with --masks). "
                                                          "DICOM SEG objects and NAME.mask.png / NAME_mask.nii.gz files among them are masks.")] = None,
    *,
    masks: Annotated[Path | None, typer.Option("--masks", help="CSV of image,mask[,label] rows (PyRadiomics' batch format).")] = None,
    from_cam: Annotated[bool, typer.Option("--from-cam", help="Measure the regions `cxrtool explain` wrote for these studies.")] = False,
    explanations: Annotated[Path | None, typer.Option("--explanations", help="Where explain wrote (its --out folder); implies --from-cam. "
                                                          "Studies are then optional: its sidecars say where they are.")] = None,
    positive_only: Annotated[bool, typer.Option("--positive-only", help="With --from-cam: only the findings the model called positive.")] = False,
    model: Annotated[str | None, typer.Option("--model", "-m", help="With --from-cam: only this model's maps (its name or id), when several explained the studies.")] = None,
    include_off_chest: Annotated[bool, typer.Option("--include-off-chest", help="With --from-cam: also measure regions off the chest, and those of maps explain marked as lying outside it (left out by default, with a count).")] = False,
    params: Annotated[Path | None, typer.Option("--params", help="PyRadiomics parameter file (YAML); default: cxrtool's 2D set.")] = None,
    classes: Annotated[str | None, typer.Option("--classes", help="Only these feature classes, e.g. firstorder,shape2D,glcm.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output CSV (default: cxrtool_radiomics.csv beside the inputs).")] = None,
    json_too: Annotated[bool, typer.Option("--json", help="Also write the rows as JSON beside the CSV (same name, .json).")] = False,
    workers: Annotated[int | None, typer.Option("--workers", "-j", min=1, help="Processes (default: all cores).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Measure everything again; replaces a table measured with other settings.")] = False,
) -> None:
    """Radiomic features per (study, region): from a mask CSV, from explain's CAM regions,
    from masks beside the studies (PNG/NIfTI named NAME.mask.*, or DICOM SEG objects among
    the inputs), or of whole images. One CSV row per region; interrupted runs resume where
    they stopped.

    Exit status: 0 all rows measured, 1 some rows failed (reason in the error column),
    2 usage error (e.g. an invalid parameter file, a table measured with other settings),
    130 interrupted.
    """
    from cxrtool._runner import output_root
    from cxrtool.errors import UsageError
    from cxrtool.io.studies import find_studies
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
    from_cam = from_cam or explanations is not None
    if explanations is not None and not explanations.is_dir():
        fail(f"{explanations}: no such folder (give the folder cxrtool explain wrote with --out)")
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
        if not inputs and explanations is None:
            fail("give studies (with --from-cam for explain's regions), --explanations DIR, or --masks CSV")
        studies = list(find_studies(inputs or []))
        if (positive_only or model or include_off_chest) and not from_cam:
            fail("--positive-only, --model and --include-off-chest go with --from-cam")
        if from_cam:
            jobs, unexplained, skipped = jobs_from_cam(studies, positive_only=positive_only, explanations=explanations,
                                                       model=model, include_off_chest=include_off_chest)
            if skipped:
                reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.items())
                left_out = (f"{sum(skipped.values())} CAM regions left out as not evidence on the chest ({reasons}); "
                            "--include-off-chest measures them too")
                if not jobs:
                    fail(f"no regions to measure: {left_out}", EXIT_USAGE)
                note(left_out)
            if unexplained:
                warn(f"{len(unexplained)} studies have no explanations (run cxrtool explain first, and give its --out "
                     f"folder with --explanations), or changed since they were explained, e.g. {unexplained[0]}")
        else:
            jobs, counts = jobs_from_studies(studies)
            if counts["seg"] or counts["beside"]:
                note(f"{counts['seg']} regions from DICOM SEG, {counts['beside']} from masks beside the studies, "
                     f"{counts['whole']} whole images")
            if counts["unmatched_seg"]:
                warn(f"{counts['unmatched_seg']} DICOM SEG objects reference none of the input images (give the images too) or cannot be read")
        root = output_root(studies) or (explanations.absolute() if explanations is not None else Path.cwd())
        default_folder = Path(os.path.relpath(root)) if root.is_relative_to(Path.cwd()) else root
    if not jobs:
        if from_cam and explanations is None and not studies:
            fail("no studies in the inputs (the folder explain wrote with --out holds its outputs, not the studies: "
                 "give it as --explanations DIR)", EXIT_USAGE)
        fail("no regions to measure", EXIT_USAGE)
    table = out or default_folder / "cxrtool_radiomics.csv"
    bar = progress_bar()
    task = bar.add_task("radiomics", total=len(jobs), status="")
    with handle_interrupt(), bar:
        try:
            summary = run_regions(jobs, table, params=settings, classes=chosen, workers=workers or os.cpu_count() or 1,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total),
                                  json_out=table.with_suffix(".json") if json_too else None, overwrite=overwrite)
        except UsageError as error:
            fail(str(error))
    if summary.restarted:
        warn(f"{summary.table}: it held features measured with other settings; replaced (--overwrite)")
    if summary.changed:
        note(f"{summary.changed} regions measured again: their image or mask changed since")
    if summary.stale:
        warn(f"{summary.stale} rows of other regions left out of {summary.table}: their image or mask changed since "
             "they were measured (measure them again to bring them back)")
    note(f"[green]{summary.measured} regions measured[/], {summary.resumed} from an earlier run, "
         f"[{'red' if summary.failed else 'green'}]{len(summary.failed)} failed[/] of {summary.total}")
    note(f"  {summary.table}" + (f"\n  {summary.json}" if summary.json else ""))
    if summary.failed:
        warn(f"{len(summary.failed)} regions could not be measured, e.g. {summary.failed[0][0]}: {summary.failed[0][1]}")
    raise typer.Exit(summary.exit_code)
