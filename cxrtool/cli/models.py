"""``cxrtool models``: the known architectures and importable weight sets, a checkpoint's
card, and ``cxrtool models import xrv:NAME`` (TorchXRayVision's classifiers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from typer.core import TyperGroup

from cxrtool.cli._console import Workers, fail, note, out, show
from cxrtool.cli.predict import TtaFlipOption, TtaOption, ViewsOption


class _ShowByDefault(TyperGroup):
    """``cxrtool models FILE`` shows FILE's card: anything that is not a subcommand is."""

    def parse_args(self, ctx, args):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["show", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_ShowByDefault, invoke_without_command=True, no_args_is_help=False,
                  help="Architectures and importable weight sets, a checkpoint's card, or import a weight set.")


@app.callback()
def models(
    ctx: typer.Context,
    *,
    available: Annotated[bool, typer.Option("--available", help="List the weight sets `cxrtool models import` can import.")] = False,
) -> None:
    """List architectures (with their CAM layers) and label sets; `models FILE` shows a
    checkpoint's card; `models import xrv:NAME --out FILE` imports a TorchXRayVision classifier."""
    if ctx.invoked_subcommand is not None:
        return
    if available:
        _available()
        return
    from cxrtool.registry import ARCHITECTURES, DEFAULT_ARCHITECTURE, LABEL_SETS

    table = Table(title="Architectures (any timm name also works for train/predict)")
    table.add_column("architecture")
    table.add_column("CAM layer")
    table.add_column("note")
    for arch in ARCHITECTURES.values():
        remark = arch.note + (" (default)" if arch.name == DEFAULT_ARCHITECTURE else "")
        table.add_row(arch.name, arch.cam_layer, remark)
    show(table)
    labels = Table(title="Label sets")
    labels.add_column("name")
    labels.add_column("findings")
    for name, findings in LABEL_SETS.items():
        labels.add_row(name, ", ".join(findings))
    show(labels)
    from cxrtool.registry import DEFAULT_HEAD, DEFAULT_LOSS, HEADS, LOSSES, PRESETS

    for title, names, default in (("Heads (train --head)", HEADS, DEFAULT_HEAD), ("Loss terms (train --loss, e.g. asl+0.2*apcl)", LOSSES, DEFAULT_LOSS)):
        listing = Table(title=title)
        listing.add_column("name")
        listing.add_column("what it is")
        for name, text in names.items():
            listing.add_row(name + (" (default)" if name == default else ""), text)
        show(listing)
    presets = Table(title="Presets (train --preset)")
    for column in ("name", "settings"):
        presets.add_column(column)
    for name, values in PRESETS.items():
        presets.add_row(name, ", ".join(f"{key}: {value}" for key, value in values.items()))
    show(presets)
    note("pretrained weight sets to import: cxrtool models --available")


def _available() -> None:
    """The importable weight sets of every registered importer."""
    from cxrtool.models.sources import importers

    for importer in importers().values():
        rows, missing = importer.available()
        table = Table(title=f"{importer.library} weight sets to import (cxrtool models import {importer.prefix}:NAME --out FILE)")
        for column in ("name", "architecture", "input"):
            table.add_column(column, no_wrap=True)
        table.add_column("trained on", max_width=36)  # long lists wrap by word: nothing is cut
        table.add_column("findings", max_width=60)
        for row in rows:
            table.add_row(row["name"], row["architecture"], row["input"], row["trained on"], row["findings"])
        show(table)
        if missing:
            note(missing)


@app.command("show")
def show_card(
    checkpoint: Annotated[Path, typer.Argument(help="A cxrtool checkpoint (.safetensors).")],
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
) -> None:
    """A checkpoint's model card: findings, thresholds, preprocessing, where it came from."""
    from cxrtool.models.checkpoint import CheckpointError, read_card

    try:
        card = read_card(checkpoint)
    except CheckpointError as error:
        fail(str(error))
    if as_json:
        out.print_json(card.to_json())
        return
    table = Table(title=f"{checkpoint}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("name", card.name)
    table.add_row("architecture", card.architecture)
    table.add_row("head", card.head + (f" {json.dumps(card.head_settings)}" if card.head_settings else ""))
    table.add_row("input", json.dumps(card.preprocessing))
    table.add_row("created", f"{card.created} (cxrtool {card.cxrtool_version})")
    training = card.training
    if card.source:
        source = card.source
        table.add_row("imported from", f"{source.get('library')} {source.get('library_version', '')}: {source.get('weights')} "
                      f"({source.get('file')}, SHA-256 {source.get('sha256')})")
        table.add_row("licence", str(source.get("licence", "")))
        table.add_row("trained on", str(training.get("trained_on", "?")))
    elif training:
        table.add_row("trained on", f"{training.get('labels', '?')} ({training.get('labels_format', '?')}): "
                      f"{training.get('n_train', '?')} train / {training.get('n_val', '?')} validation images")
        table.add_row("loss / epochs", f"{training.get('loss', '?')} / best epoch {training.get('best_epoch', '?')} of {training.get('epochs', '?')}")
        if training.get("preset"):
            table.add_row("preset", str(training["preset"]))
        feedback = training.get("feedback")
        if feedback:
            cycles = feedback.get("cycles", [])
            table.add_row("radiomics feedback", (
                f"a cycle every {feedback.get('every_epochs')} epoch(s) on {feedback.get('fraction_per_cycle', 1):.0%} of the "
                f"images, {(feedback.get('map') or {}).get('method')} maps, "
                f"{(feedback.get('extractor') or {}).get('features')} PyRadiomics features; "
                f"{len(cycles)} cycle(s) up to this checkpoint"
                + (f", the last: {cycles[-1].get('regions')} of {cycles[-1].get('pool', '?')} images with a region"
                   if cycles else "")
                + (f" ({cycles[-1]['regions_in_border_band']:.0%} of them centred in the film's outer tenth)"
                   if cycles and cycles[-1].get("regions_in_border_band") is not None else "")
                + (f"; {feedback['unlabelled_images']} unlabelled images" if feedback.get("unlabelled_images") else "")))
        if training.get("priors"):
            priors = training["priors"]
            table.add_row("priors", f"co-occurrence: {priors.get('cooccurrence', '-')}; text: {priors.get('text_encoder') or 'learned'}")
        if training.get("init"):
            init = training["init"]
            table.add_row("fine-tuned from", f"{init.get('name')} (SHA-256 {init.get('sha256')})")
    if card.metrics.get("val_mean_auroc") is not None:
        table.add_row("validation mean AUROC", f"{card.metrics['val_mean_auroc']:.4f}")
    if card.calibration:
        table.add_row("calibration", f"{card.calibration.get('method')}: {card.calibration.get('positive_when', '')}")
    show(table)
    points = (card.calibration or {}).get("operating_points", {})
    findings = Table(title=f"Findings (thresholds by {card.threshold_method})")
    findings.add_column("finding")
    findings.add_column("threshold", justify="right")
    if points:
        findings.add_column("operating point", justify="right")
    findings.add_column("val AUROC", justify="right")
    per = card.metrics.get("val_auroc", {})
    for finding in card.findings:
        auroc = per.get(finding)
        cells = [finding, f"{card.threshold_for(finding):.3f}"]
        if points:
            cells.append(f"{points[finding]:.4f}")
        findings.add_row(*cells, "-" if auroc is None else f"{auroc:.3f}")
    show(findings)


@app.command("import")
def import_weights(
    spec: Annotated[str, typer.Argument(help="The weight set: xrv:NAME (see cxrtool models --available).")],
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="The checkpoint to write (.safetensors).")],
    weights: Annotated[Path | None, typer.Option("--weights", help="The set's file, downloaded elsewhere (an offline machine); "
                                                 "default: TorchXRayVision's cache, else it downloads it.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="The model's name on its card (default xrv-NAME).")] = None,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Unpickle the weights file although its SHA-256 is "
                                               "not one of TorchXRayVision's published files: its pickle may then run code "
                                               "on import (only through the classes a weights file needs; anything else is "
                                               "refused). Only for files you made or trust.")] = False,
) -> None:
    """Import a TorchXRayVision classifier once into an ordinary cxrtool checkpoint (the only
    step that unpickles anything), with XRV's preprocessing and operating points on its card."""
    from cxrtool.errors import UsageError
    from cxrtool.models.sources import importers

    prefix, _, set_name = spec.partition(":")
    known = importers()
    if prefix not in known or not set_name:
        fail(f"expected {' or '.join(f'{p}:NAME ({i.library})' for p, i in known.items())}, got {spec!r} "
             "(cxrtool models --available lists the sets)")
    try:
        report = known[prefix].run(set_name, out, weights=weights, model_name=name, trust_pickle=trust_pickle,
                                     say=note)
    except UsageError as error:
        fail(str(error))
    note(f"[green]{report.checkpoint}[/]: {report.weights.architecture} at {report.weights.input_size} px, "
         f"{len(report.findings)} findings: {', '.join(report.findings)}")
    if report.dropped:
        note(f"  left out ({known[prefix].library} outputs without a trained operating point): {', '.join(report.dropped)}")
    note(f"  card: cxrtool models {report.checkpoint}")


@app.command("calibrate")
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="A bundle file (.yaml).")],
    *,
    labels: Annotated[Path, typer.Option("--labels", "-l", help="Labelled validation studies: NIH, CheXpert/MIMIC or "
                                         "generic CSV (not the studies the bundle's members trained on).")],
    images: Annotated[str | None, typer.Option("--images", help="Image root (default: beside the label CSV).")] = None,
    method: Annotated[str, typer.Option("--method", help="Threshold method: f1 or youden.")] = "f1",
    views: ViewsOption = None,
    tta: TtaOption = "none",
    tta_flip: TtaFlipOption = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 16,
    workers: Workers = None,
    device: Annotated[str, typer.Option("--device")] = "auto",
) -> None:
    """Choose a bundle's own thresholds on validation studies (and keep each member's
    validation scores, which merge: rank needs), beside the bundle as NAME.calibration.json.
    Calibrate with the --tta you will predict with."""
    from cxrtool.bundle_calibration import calibrate_bundle
    from cxrtool.cli._console import handle_interrupt, progress_bar
    from cxrtool.errors import UsageError
    from cxrtool.models.checkpoint import CheckpointError
    from cxrtool.preprocess import TestTimeAugmentation

    bar = progress_bar()
    task = bar.add_task("calibrate", total=None, status="")
    with handle_interrupt():
        try:
            with bar:
                report = calibrate_bundle(bundle, labels, images=images, method=method, views=views,
                                          batch_size=batch_size, workers=workers, device=device,
                                          tta=TestTimeAugmentation(tta, tta_flip),
                                          progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (CheckpointError, UsageError, ValueError, FileNotFoundError) as error:
            fail(str(error))
    note(f"[green]{report.path}[/]: thresholds of {len(report.thresholds)} findings on {report.studies} validation studies")
    for finding, threshold in report.thresholds.items():
        note(f"  {finding}: {threshold:.4f} ({report.per_finding.get(finding, 0)} labelled studies)")
    for line in report.notes:
        note(f"  {line}")
    if report.failed:
        note(f"  {len(report.failed)} studies could not be scored (first: {report.failed[0][0]}: {report.failed[0][1]})")
