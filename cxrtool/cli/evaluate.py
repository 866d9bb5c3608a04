"""``cxrtool evaluate``: classification metrics of a predictions CSV against labels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._console import fail, note, out


def evaluate(
    predictions: Annotated[Path, typer.Argument(help="A cxrtool_predictions.csv (file column + one probability column per finding).")],
    *,
    labels: Annotated[Optional[Path], typer.Option("--labels", "-l", help="Labels: NIH Data_Entry, CheXpert style or generic CSV.")] = None,
    boxes: Annotated[Optional[Path], typer.Option("--boxes", help="True boxes (NIH BBox_List or file,finding,x,y,w,h): score what explain wrote.")] = None,
    pointing_tolerance: Annotated[float, typer.Option("--pointing-tolerance", min=0, help="Pointing game: pixels a peak may lie outside a true box.")] = 0.0,
    labels_format: Annotated[str, typer.Option("--labels-format", help="auto, nih, chexpert or generic.")] = "auto",
    model: Annotated[Optional[Path], typer.Option("--model", "-m", help="Take decision thresholds from this checkpoint.")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="One threshold for every finding (overrides stored ones).")] = None,
    uncertain: Annotated[str, typer.Option("--uncertain", help="CheXpert -1 labels: ignore, positive or negative.")] = "ignore",
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for evaluation.json/.csv and curves (default: beside the CSV).")] = None,
    n_boot: Annotated[int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for 95% intervals (0 = none).")] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """AUROC, AUPRC, F1, sensitivity and specificity per finding, macro and micro, with
    bootstrap 95% intervals; a table here, JSON/CSV and ROC/PR curves on disk.

    With --boxes, also localization: IoU and IoBB accuracy at 0.1-0.7 and the pointing game
    of the boxes and maps that `cxrtool explain` wrote beside the CSV (localization.json/.csv).

    Thresholds: --threshold, else --model's card, else those recorded by predict beside the
    CSV (cxrtool_predictions.json), else 0.5.
    """
    from cxrtool.evaluate import evaluate as run_evaluate
    from cxrtool.evaluate.classification import render_table

    if not predictions.is_file():
        fail(f"{predictions}: no such predictions file")
    if labels is None and boxes is None:
        fail("give --labels (classification), --boxes (localization), or both")
    for given in (labels, boxes):
        if given is not None and not given.is_file():
            fail(f"{given}: no such file")
    if labels is not None:
        thresholds = _thresholds(predictions, model, threshold)
        try:
            report = run_evaluate(
                predictions, labels, labels_format=labels_format, thresholds=thresholds, out_dir=out_dir,
                n_boot=n_boot, seed=seed, uncertain=uncertain,
            )
        except ValueError as error:
            fail(str(error))
        out.print(render_table(report))
        for remark in report.notes:
            note(f"[yellow]note:[/] {remark}")
        for path in report.paths.values():
            note(f"  {path}")
    if boxes is not None:
        from cxrtool.evaluate.localization import evaluate_localization, render_localization

        try:
            located = evaluate_localization(predictions, boxes, tolerance=pointing_tolerance, out_dir=out_dir)
        except ValueError as error:
            fail(str(error))
        out.print(render_localization(located))
        if located.overall.mapped < located.overall.pairs:
            note(f"[yellow]note:[/] {located.overall.pairs - located.overall.mapped} boxed (image, finding) pairs have no map "
                 "and count as misses; explain with --finding all (or the boxed findings) to map them")
        for path in located.paths.values():
            note(f"  {path}")


def _thresholds(predictions: Path, model: Optional[Path], threshold: Optional[float]):
    if threshold is not None:
        return threshold
    if model is not None:
        from cxrtool.models.checkpoint import CheckpointError, read_card

        try:
            card = read_card(model)
        except CheckpointError as error:
            fail(str(error))
        return {f: card.threshold_for(f) for f in card.findings}
    from cxrtool.evaluate import recorded_thresholds

    return recorded_thresholds(predictions)
