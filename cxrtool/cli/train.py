"""``cxrtool train``: a multi-label classifier from NIH, CheXpert/MIMIC or generic labels.

Settings layer as defaults < ``--config`` YAML < flags < ``--set key=value``. Under
``torchrun --nproc_per_node N -m cxrtool train ...`` the same command trains with
DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from cxrtool.cli._console import fail, handle_interrupt, note, progress_bar, training_progress


def train(
    labels: Annotated[Optional[str], typer.Argument(help="Label CSV: NIH Data_Entry, CheXpert/MIMIC style, or generic (path + 0/1 columns).")] = None,
    *,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML settings file.")] = None,
    images: Annotated[Optional[str], typer.Option("--images", help="Image root (default: beside the label CSV).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder for checkpoint, state and config.")] = None,
    architecture: Annotated[Optional[str], typer.Option("--arch", "-a", help="timm backbone, e.g. densenet121, resnet50, convnext_tiny.")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", "-e", min=1)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="bce, weighted_bce, focal or asl.")] = None,
    input_size: Annotated[Optional[int], typer.Option("--input-size")] = None,
    findings: Annotated[Optional[str], typer.Option("--findings", help="Comma-separated findings to train on (default: the label file's).")] = None,
    uncertain: Annotated[Optional[str], typer.Option("--uncertain", help="CheXpert -1 labels: ignore, positive or negative.")] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--scratch", help="Start from ImageNet weights (needs the network).")] = None,
    device: Annotated[Optional[str], typer.Option("--device")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", min=0)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any setting as key=value (repeatable).")] = None,
) -> None:
    """Train and keep the best checkpoint by validation mean AUROC."""
    from cxrtool.models.checkpoint import CheckpointError
    from cxrtool.train.config import load_config, parse_overrides
    from cxrtool.train.loop import train as run_train

    flags = {
        "labels": labels, "images": images, "out": out, "architecture": architecture, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "loss": loss, "input_size": input_size, "uncertain": uncertain,
        "pretrained": pretrained, "device": device, "workers": workers, "seed": seed,
        "findings": [f.strip() for f in findings.split(",") if f.strip()] if findings else None,
    }
    try:
        overrides = {**flags, **parse_overrides(set_ or [])}
        settings = load_config(config, overrides)
        settings.validate()
    except (ValueError, OSError) as error:
        fail(str(error))
    if settings.pretrained and os.environ.get("HF_HUB_OFFLINE") == "1":
        fail("--pretrained needs the network to fetch ImageNet weights, but HF_HUB_OFFLINE=1; use --scratch")

    main_process = int(os.environ.get("RANK", "0")) == 0
    bar = progress_bar()
    on_event = training_progress(bar)

    with handle_interrupt():
        try:
            with bar if main_process else contextlib.nullcontext():
                result = run_train(settings, resume=resume, progress=on_event)
        except (ValueError, FileNotFoundError, CheckpointError) as error:
            fail(str(error))
    if main_process:
        note(f"[green]best validation mean AUROC {result.best_auroc:.4f}[/] at epoch {result.best_epoch} "
             f"({result.n_train} train / {result.n_val} validation images)")
        note(f"  checkpoint: {result.checkpoint}")
        note(f"  config:     {result.config_path}")
