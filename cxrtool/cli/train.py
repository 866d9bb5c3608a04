"""``cxrtool train``: a multi-label classifier from NIH, CheXpert/MIMIC or generic labels.

Settings layer as defaults < ``--config`` YAML < flags < ``--set key=value``. Under
``torchrun --nproc_per_node N -m cxrtool train ...`` the same command trains with
DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated

import typer

from cxrtool.cli._console import Workers, fail, handle_interrupt, note, one_of, progress_bar, training_progress
from cxrtool.registry import (
    DEFAULT_ARCHITECTURE,
    DEFAULT_HEAD,
    DEFAULT_LOSS,
    HEADS,
    LOSSES,
    PRESETS,
    SAMPLINGS,
    TASKS,
    UNCERTAIN_POLICIES,
)


def train(
    labels: Annotated[str | None, typer.Argument(help="Label CSV: NIH Data_Entry, CheXpert/MIMIC style, PadChest (labels as lists), or generic (path + 0/1 columns).")] = None,
    *,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML settings file.")] = None,
    task: Annotated[str | None, typer.Option("--task", callback=one_of(tuple(TASKS)),
                                             help="findings (default), or view: a view classifier (PA, AP, LATERAL) from "
                                                  "the labels' view column, for bundles to route studies without a "
                                                  "ViewPosition tag.")] = None,
    images: Annotated[str | None, typer.Option("--images", help="Image root (default: beside the label CSV).")] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Run folder for checkpoint, state and config.")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Start from this cxrtool checkpoint (trained or imported): its backbone, "
                                             "input and preprocessing; findings it has keep their head rows, new ones get new rows.")] = None,
    architecture: Annotated[str | None, typer.Option("--arch", "-a", help=f"timm backbone, e.g. resnet50, convnext_tiny (default {DEFAULT_ARCHITECTURE}).")] = None,
    head: Annotated[str | None, typer.Option("--head", callback=one_of(tuple(HEADS)),
                                             help=f"Classification head: {', '.join(HEADS)} (default {DEFAULT_HEAD}).")] = None,
    preset: Annotated[str | None, typer.Option("--preset", callback=one_of(tuple(PRESETS)),
                                               help=f"A paper's recipe: {', '.join(PRESETS)} (its head and loss; "
                                                    "flags and the YAML file still win).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", "-e", min=1)] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1)] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    loss: Annotated[str | None, typer.Option("--loss", help=f"Loss terms, optionally weighted and joined by +, e.g. asl or "
                                             f"asl+0.5*bce; terms: {', '.join(LOSSES)} (default {DEFAULT_LOSS}).")] = None,
    sampling: Annotated[str | None, typer.Option("--sampling", callback=one_of(tuple(SAMPLINGS)),
                                                 help="uniform (default) or class_aware: each draw a finding chosen "
                                                      "uniformly, then one of its positive images.")] = None,
    logit_adjustment: Annotated[float | None, typer.Option("--logit-adjustment", min=0.0,
                                                           help="tau: the classification loss sees logits + tau * "
                                                                "log-odds of each finding's prevalence (0 = off).")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size")] = None,
    findings: Annotated[str | None, typer.Option("--findings", help="Comma-separated findings to train on, or a label set's name (e.g. cxr-lt-2026; see cxrtool models) "
                                                   "(default: the label file's).")] = None,
    projections: Annotated[str | None, typer.Option("--projections", help="Train on these projections' images only, "
                                                       "e.g. PA or AP,PA (from the labels' view column): a model for a "
                                                       "bundle's route.")] = None,
    unlabelled: Annotated[str | None, typer.Option("--unlabelled", help="Radiographs without labels (a folder, or a CSV with a "
                                                   "path column): they enter the radiomics contrast only (paper 4; "
                                                   "--preset radiomics-feedback).")] = None,
    feedback_every: Annotated[int | None, typer.Option("--feedback-every", min=1,
                                                       help="The radiomics term's feedback cycle: before every E-th epoch "
                                                            "(default 1) the model's maps are measured again.")] = None,
    uncertain: Annotated[str | None, typer.Option("--uncertain", callback=one_of(UNCERTAIN_POLICIES),
                                                      help=f"CheXpert -1 labels: {', '.join(UNCERTAIN_POLICIES)}.")] = None,
    pretrained: Annotated[bool | None, typer.Option("--pretrained/--scratch", help="Start from ImageNet weights (needs the network).")] = None,
    device: Annotated[str | None, typer.Option("--device")] = None,
    workers: Workers = None,
    image_cache: Annotated[str | None, typer.Option("--image-cache", help="auto (default): each image decoded once into a "
                                                    "persistent cache ($CXRTOOL_CACHE/train-images) that later runs "
                                                    "and torchrun's ranks reuse; memory: this run's memory only; off: "
                                                    "read every image each epoch; or the cache's folder.")] = None,
    image_cache_info: Annotated[bool, typer.Option("--image-cache-info", help="Say what the persistent image cache "
                                                   "holds, by preprocessing (without a label CSV: only that).")] = False,
    clear_image_cache: Annotated[bool, typer.Option("--clear-image-cache", help="Empty the persistent image cache "
                                                    "(without a label CSV: only that).")] = False,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Any setting as key=value (repeatable).")] = None,
) -> None:
    """Train and keep the best checkpoint by validation mean AUROC."""
    from cxrtool.models.checkpoint import CheckpointError
    from cxrtool.train.config import load_config, parse_overrides
    from cxrtool.train.loop import train as run_train

    flags = {
        "task": task, "labels": labels, "images": images, "out": out, "init": init, "architecture": architecture, "head": head, "preset": preset, "epochs": epochs,
        "batch_size": batch_size, "lr": lr, "loss": loss, "sampling": sampling, "logit_adjustment": logit_adjustment, "input_size": input_size, "uncertain": uncertain,
        "pretrained": pretrained, "device": device, "workers": workers, "seed": seed, "unlabelled": unlabelled,
        "image_cache": image_cache,
        "feedback_every": feedback_every,
        "findings": [f.strip() for f in findings.split(",") if f.strip()] if findings else None,
        "projections": [p.strip().upper() for p in projections.split(",") if p.strip()] if projections else None,
    }
    try:
        overrides = {**flags, **parse_overrides(set_ or [])}
        settings = load_config(config, overrides)
        if image_cache_info or clear_image_cache:
            _look_after_image_cache(settings.image_cache, clear=clear_image_cache)
            if not settings.labels:
                return
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


def _look_after_image_cache(image_cache: str, *, clear: bool) -> None:
    """Say what the persistent image cache holds (``--image-cache-info``), or empty it
    (``--clear-image-cache``), saying what it held."""
    from rich.markup import escape

    from cxrtool.train.cache import cache_contents, clear_cache, default_folder, persistent_folder

    folder = persistent_folder(image_cache) or default_folder()
    if clear and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        fail("--clear-image-cache under torchrun would empty the cache while the other ranks fill it: "
             "run cxrtool train --clear-image-cache before launching torchrun")
    parts = clear_cache(folder) if clear else cache_contents(folder)
    squares, failures = sum(p.squares for p in parts), sum(p.failures for p in parts)
    size = sum(p.bytes for p in parts) / 2**20
    note(escape(f"image cache {folder}{' emptied' if clear else ''}: {squares} squares, {failures} unreadable files "
                f"remembered, {size:.1f} MiB ({len(parts)} preprocessings)"))
    if not clear:
        for part in parts:
            note(escape(f"  {part.folder.name}: {part.squares} squares, {part.failures} unreadable, "
                        f"{part.bytes / 2**20:.1f} MiB"))
