"""``cxrtool evaluate``: classification metrics of a predictions CSV against labels, and
the table of them on the screen (``render_table``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cxrtool.cli._console import fail, note, one_of, show
from cxrtool.registry import LABEL_FORMATS, UNCERTAIN_POLICIES

if TYPE_CHECKING:
    from cxrtool.evaluate.classification import EvaluationReport


def evaluate(
    predictions: Annotated[list[Path], typer.Argument(help="cxrtool_predictions.csv tables, or folders holding them (searched recursively).")],
    *,
    labels: Annotated[Path | None, typer.Option("--labels", "-l", help="Labels: NIH Data_Entry, CheXpert style or generic CSV.")] = None,
    boxes: Annotated[Path | None, typer.Option("--boxes", help="True boxes (NIH BBox_List or file,finding,x,y,w,h): score what explain wrote.")] = None,
    pointing_tolerance: Annotated[float, typer.Option("--pointing-tolerance", min=0, help="Pointing game: pixels a peak may lie outside a true box.")] = 0.0,
    labels_format: Annotated[str, typer.Option("--labels-format", callback=one_of(LABEL_FORMATS),
                                               help=f"Label table layout: {', '.join(LABEL_FORMATS)}.")] = "auto",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Score this model's rows: a checkpoint (its thresholds too), or a model name or id from the table. Required when the table holds several models.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="One threshold for every finding (overrides stored ones).")] = None,
    uncertain: Annotated[str, typer.Option("--uncertain", callback=one_of(UNCERTAIN_POLICIES),
                                           help=f"CheXpert -1 labels: {', '.join(UNCERTAIN_POLICIES)}.")] = "ignore",
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for evaluation.json/.csv and curves (default: beside the CSV).")] = None,
    n_boot: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for 95% intervals (0 = none).")] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """AUROC, AUPRC, F1, sensitivity and specificity per finding, macro and micro, with
    bootstrap 95% intervals; a table here, JSON/CSV and ROC/PR curves on disk.

    With --boxes, also localization: IoU and IoBB accuracy at 0.1-0.7, the pointing game
    (with bootstrap intervals), the share of map peaks in the film's border band and of maps
    marked as lying outside the chest, and the faithfulness score where explain measured it
    (--faithfulness), of the boxes and maps that `cxrtool explain` wrote beside the CSV
    (localization.json/.csv).

    Thresholds: --threshold, else --model's card, else those recorded by predict beside the
    CSV (cxrtool_predictions.json), else 0.5.
    """
    from cxrtool.evaluate import evaluate as run_evaluate
    from cxrtool.models.checkpoint import CheckpointError

    for source in predictions:
        if not source.exists():
            fail(f"{source}: no such predictions file or folder")
    if labels is None and boxes is None:
        fail("give --labels (classification), --boxes (localization), or both")
    for given in (labels, boxes):
        if given is not None and not given.is_file():
            fail(f"{given}: no such file")
    if labels is not None:
        try:
            report = run_evaluate(
                predictions, labels, model=model, labels_format=labels_format, thresholds=threshold, out_dir=out_dir,
                n_boot=n_boot, seed=seed, uncertain=uncertain,
            )
        except (ValueError, FileNotFoundError, CheckpointError) as error:
            fail(str(error))
        show(render_table(report))
        note(f"thresholds: {report.settings['thresholds_from']}")
        for remark in report.notes:
            note(f"[yellow]note:[/] {remark}")
        for path in report.paths.values():
            note(f"  {path}")
    if boxes is not None:
        from cxrtool.evaluate.localization import evaluate_localization, render_localization

        try:
            located = evaluate_localization(predictions, boxes, tolerance=pointing_tolerance, out_dir=out_dir, model=model,
                                            n_boot=n_boot, seed=seed)
        except (ValueError, FileNotFoundError) as error:
            fail(str(error))
        show(render_localization(located))
        if located.overall.mapped < located.overall.pairs:
            note(f"[yellow]note:[/] {located.overall.pairs - located.overall.mapped} boxed (image, finding) pairs have no map "
                 "and count as misses; explain with --finding all (or the boxed findings) to map them")
        for path in located.paths.values():
            note(f"  {path}")


def render_table(report: EvaluationReport) -> Any:
    """A rich Table of the report for the terminal.

    Columns: finding, n, pos, AUROC [95% CI], AUPRC, F1, Sens, Spec, threshold; macro and
    micro rows at the bottom.

    Example:
        >>> from rich.console import Console
        >>> Console().print(render_table(report))
    """
    from rich.table import Table

    def num(v: float | None, digits: int = 3) -> str:
        return "—" if v is None or math.isnan(v) else f"{v:.{digits}f}"

    table = Table(title="Classification metrics", title_justify="left")
    table.add_column("Finding", style="bold")
    for name in ("n", "pos"):
        table.add_column(name, justify="right")
    table.add_column("AUROC [95% CI]", justify="right")
    for name in ("AUPRC", "F1", "Sens", "Spec", "Thr"):
        table.add_column(name, justify="right")
    rows = [*report.findings, report.macro, report.micro]
    for k, row in enumerate(rows):
        low, high = row.ci.get("auroc", (math.nan, math.nan))
        ci = "" if math.isnan(low) else f" [{low:.3f}–{high:.3f}]"
        table.add_row(
            row.finding,
            str(row.n),
            str(row.positives),
            num(row.auroc) + ci,
            num(row.auprc),
            num(row.f1),
            num(row.sensitivity),
            num(row.specificity),
            num(row.threshold, 2),
            end_section=k == len(report.findings) - 1,
            style="italic" if row.finding in ("macro", "micro") else None,
        )
    return table
