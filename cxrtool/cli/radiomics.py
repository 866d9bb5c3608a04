"""``cxrtool radiomics``: PyRadiomics features of regions of studies, as one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cxrtool.cli._console import (
    RESUME_WITHOUT_OVERWRITE,
    AeTitle,
    EngineOption,
    RayAddress,
    StoreTo,
    Workers,
    fail,
    handle_interrupt,
    note,
    progress_bar,
    warn,
)


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
    workers: Workers = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Measure everything again; replaces a table measured with other settings.")] = False,
    dicom: Annotated[str | None, typer.Option("--dicom", help="sr: also a DICOM Structured Report of each DICOM image's regions, "
                                              "each region's features as its measurements (IBSI codes as pyradiomics-dcm "
                                              "writes them), NAME.cxrtool[.<model id>].radiomics.sr.dcm beside the region's "
                                              "mask. Needs highdicom. PNG and JPEG images get none.")] = None,
    store_to: StoreTo = None,
    ae_title: AeTitle = "CXRTOOL",
    engine: EngineOption = "local",
    ray_address: RayAddress = None,
) -> None:
    """Radiomic features per (study, region): from a mask CSV, from explain's CAM regions,
    from masks beside the studies (PNG/NIfTI named NAME.mask.*, or DICOM SEG objects among
    the inputs), or of whole images. One CSV row per region; interrupted runs resume where
    they stopped.

    Exit status: 0 all rows measured, 1 some rows failed (reason in the error column),
    2 usage error (e.g. an invalid parameter file, a table measured with other settings),
    130 interrupted.
    """
    from cxrtool.errors import UsageError
    from cxrtool.radiomics.run import radiomics as measure

    bar = progress_bar()
    task = bar.add_task("radiomics", total=None, status="")
    # --overwrite measures everything again: run again with it, an interrupted run would start over
    with handle_interrupt(RESUME_WITHOUT_OVERWRITE if overwrite else "run the same command again to resume"), bar:
        try:
            summary = measure(inputs, masks=masks, from_cam=from_cam, explanations=explanations, positive_only=positive_only,
                              model=model, include_off_chest=include_off_chest, params=params,
                              classes=[name.strip() for name in classes.split(",") if name.strip()] if classes else None,
                              out=out, json_too=json_too, workers=workers, overwrite=overwrite,
                              progress=lambda done, total: bar.update(task, completed=done, total=total), note=note, warn=warn,
                              dicom=[name.strip() for name in dicom.split(",") if name.strip()] if dicom else (),
                              store_to=store_to, ae_title=ae_title, engine=engine, ray_address=ray_address)
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
    if summary.engine.engine != "local" and summary.engine.decoded_on:
        note(f"engine: ray ({summary.engine.address or 'a local instance'}): {sum(summary.engine.decoded_on.values())} "
             f"regions measured on {len(summary.engine.decoded_on)} node(s)")
    note(f"  {summary.table}" + (f"\n  {summary.json}" if summary.json else ""))
    if summary.failed:
        warn(f"{len(summary.failed)} regions could not be measured, e.g. {summary.failed[0][0]}: {summary.failed[0][1]}")
    raise typer.Exit(summary.exit_code)
