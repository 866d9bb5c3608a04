"""``cxrtool models``: the known architectures, or a checkpoint's card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cxrtool.cli._console import fail, out, show


def models(
    checkpoint: Annotated[Path | None, typer.Argument(help="Show this checkpoint's model card.")] = None,
    *,
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
) -> None:
    """List architectures (with their CAM layers) or show a checkpoint's card."""
    from cxrtool.registry import ARCHITECTURES, DEFAULT_ARCHITECTURE, LABEL_SETS

    if checkpoint is None:
        table = Table(title="Architectures (any timm name also works for train/predict)")
        table.add_column("architecture")
        table.add_column("CAM layer")
        table.add_column("note")
        for arch in ARCHITECTURES.values():
            note = arch.note + (" (default)" if arch.name == DEFAULT_ARCHITECTURE else "")
            table.add_row(arch.name, arch.cam_layer, note)
        show(table)
        labels = Table(title="Label sets")
        labels.add_column("name")
        labels.add_column("findings")
        for name, findings in LABEL_SETS.items():
            labels.add_row(name, ", ".join(findings))
        show(labels)
        return

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
    table.add_row("input", json.dumps(card.preprocessing))
    table.add_row("created", f"{card.created} (cxrtool {card.cxrtool_version})")
    training = card.training
    if training:
        table.add_row("trained on", f"{training.get('labels', '?')} ({training.get('labels_format', '?')}): "
                      f"{training.get('n_train', '?')} train / {training.get('n_val', '?')} validation images")
        table.add_row("loss / epochs", f"{training.get('loss', '?')} / best epoch {training.get('best_epoch', '?')} of {training.get('epochs', '?')}")
    if card.metrics.get("val_mean_auroc") is not None:
        table.add_row("validation mean AUROC", f"{card.metrics['val_mean_auroc']:.4f}")
    show(table)
    findings = Table(title=f"Findings (thresholds by {card.threshold_method})")
    findings.add_column("finding")
    findings.add_column("threshold", justify="right")
    findings.add_column("val AUROC", justify="right")
    per = card.metrics.get("val_auroc", {})
    for finding in card.findings:
        auroc = per.get(finding)
        findings.add_row(finding, f"{card.threshold_for(finding):.3f}", "-" if auroc is None else f"{auroc:.3f}")
    show(findings)
