"""``cxrtool demo``: the whole journey on the embedded phantom cohort, on the CPU.

Generates a phantom training cohort (PNG) and a held-out study folder (real DICOM in
several transfer syntaxes), trains a small model, predicts beside the held-out DICOMs,
evaluates against their ground truth, and prints where everything is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from cxrtool.cli._console import EXIT_OK, fail, handle_interrupt, note, progress_bar, show, training_progress
from cxrtool.registry import CAM_METHOD_LABELS, DEFAULT_CAM_METHOD

# Sized for a CPU run of minutes that still learns every finding. Of the backbones tried on
# 2 cores (ResNet-18 at 128 and 192 px, RegNetX-200MF at 128, 192 and 256 px, with and
# without augmentation), ResNet-18 without augmentation learned fastest per minute. The
# phantoms already vary in pose, size and exposure; augmentation slowed convergence more
# than it helped at this length (measured again for the maps, issue 19: shifts, zooms and
# rotations cost 0.03-0.04 AUROC at 96 px and did not move the maps off the film's edge).
#
# The maps decide the rest (benchmarks/localization.py, 300 held-out phantoms, 96 px): the
# first releases' output stride 16 and linear head gave 6x6 maps whose Grad-CAM peaks sat
# on the film's edge (pointing game 0.24, 54% of effusion peaks in the outer tenth), though
# inpainting the true box moved the logit and the peak's region did not: the network used
# the lesion, the map did not show it. Output stride 8 (12x12 maps) brought pointing to
# 0.40; the LSE head (a score map per finding, log-sum-exp pooled, so the logit comes from
# where the map is high) to 0.56 with Grad-CAM and 0.60 with LayerCAM over the last three
# stages (0.67 over the first two, explain's default since), with the held-out mean AUROC
# up from 0.884 to 0.916 (one seed each). A step at
# output stride 8 costs about twice one at 16, so the quick run trains 7 epochs, not 8, to
# stay within its 8 minutes (8 epochs took 8.4 minutes end to end on 2 cores).
#
# The default (quick) run fits a newcomer's first minutes on 2 cores: at 96 px a training
# step costs half of one at 128 px, and per minute of training smaller inputs with more
# images beat larger inputs (training time, held-out mean AUROC on the same 300 phantoms,
# 2 cores: 96 px x 2000 images x 8 epochs 168 s, 0.897; 96 x 2400 x 8, 250 s, 0.891;
# 96 x 3200 x 5, 186 s, 0.892; 96 x 2400 x 6, 168 s, 0.865; 112 x 2000 x 8, 251 s, 0.889;
# 128 x 1600 x 8, 273 s, 0.856; 128 x 2400 x 5, 232 s, 0.864). `--full` is the first
# release's demo, 128 px x 2400 x 8 (finer maps, about twice the time).
#
# Half an epoch of warm-up, as the demo was measured with: `train`'s default became one
# epoch (for the attention heads, December 2026), and on the demo's cohort and seed one
# epoch gave a model as good at classifying (held-out mean AUROC 0.907) whose maps point
# less often (LayerCAM pointing 0.54 against 0.65 with half an epoch; cardiomegaly 0.64,
# edema 0.26): how often the maps point moves with the training run more than the AUROC.


@dataclass(frozen=True)
class DemoSize:
    train_images: int
    epochs: int
    input_size: int


# Training in bf16 (models.network.mixed_precision: a CPU with AMX or AVX-512 BF16, or a
# GPU) makes a step at 128 px 3.9x faster than in float32 on 2 cores, so the quick run
# trains at 128 px within its minutes: on seed 0, held-out mean AUROC 0.924 and pointing
# 0.73 in 359 s, where 96 px in float32 gave 0.904 and 0.70 in 446 s; on four seeds, 0.911
# and 0.68 against 0.890 and 0.64 (README, "Training in bf16 on a CPU" and "128 px in
# bf16"). A CPU without bf16 units trains in float32, where 128 px would take about 13
# minutes: it keeps the 96 px run.
QUICK = DemoSize(train_images=2000, epochs=7, input_size=128)
QUICK_FLOAT32 = DemoSize(train_images=2000, epochs=7, input_size=96)
# --full: the first release's 2400 phantoms and 8 epochs, at 192 px since training runs in
# bf16 (it was 128 px): on seed 0, held-out mean AUROC 0.960 and pointing 0.85 (nodule 0.37,
# AUROC 0.71), against 0.915 and 0.72 (nodule 0.00, AUROC 0.56) at 128 px in float32.
FULL = DemoSize(train_images=2400, epochs=8, input_size=192)
DEMO_ARCHITECTURE = "resnet18"
DEMO_INPUT_SIZE = QUICK.input_size
DEMO_OUTPUT_STRIDE = 8
# The padding: in eight paired runs replicate_undilated pointed at effusions more often
# (0.69 against 0.59) but detected pneumothoraxes, which lie along the film's edge, worse
# (AUROC 0.69 against 0.82, at chance in three runs), so the demo keeps zeros (README,
# "The frame of zeros").
DEMO_PADDING = "zeros"
PHANTOM_SIZE = 256
FOCAL_FINDINGS = ("Nodule", "Mass", "Effusion", "Pneumothorax", "Cardiomegaly")
METHOD_LABEL = CAM_METHOD_LABELS[DEFAULT_CAM_METHOD]


def quick_size(device: str) -> DemoSize:
    """The quick run's size on ``device``: :data:`QUICK` where training runs in mixed precision,
    :data:`QUICK_FLOAT32` where it runs in float32."""
    from cxrtool.models.network import mixed_precision, pick_device

    return QUICK if mixed_precision(pick_device(device)) is not None else QUICK_FLOAT32


def demo_config(labels: Path, out: Path, *, epochs: int, seed: int, device: str, workers: int,
                architecture: str = DEMO_ARCHITECTURE, input_size: int = DEMO_INPUT_SIZE,
                output_stride: int = DEMO_OUTPUT_STRIDE, augment: bool = False, padding: str = DEMO_PADDING):
    """The demo's training configuration (benchmarks/localization.py varies its sizes)."""
    from cxrtool.registry import PHANTOM_FINDINGS
    from cxrtool.train.config import load_config

    return load_config(None, {
        "labels": str(labels), "architecture": architecture, "input_size": input_size, "output_stride": output_stride,
        "padding": padding, "epochs": epochs, "batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.5, "loss": "bce", "augment": augment, "out": str(out),
        "name": "cxrtool-demo", "seed": seed, "device": device, "workers": workers, "val_fraction": 0.15,
        "findings": list(PHANTOM_FINDINGS),
    })


def demo(
    *,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the cohort, model and results.")] = Path("cxrtool-demo"),
    full: Annotated[bool, typer.Option("--full", help=f"The larger run: {FULL.train_images} phantoms at {FULL.input_size} px "
                                       "(finer maps; more than twice as long).")] = False,
    n_train: Annotated[int | None, typer.Option("--train-images", min=40, help=f"Phantom training images (default {QUICK.train_images}; "
                                                   f"--full {FULL.train_images}).")] = None,
    n_test: Annotated[int, typer.Option("--test-images", min=10, help="Held-out phantom DICOM studies.")] = 300,
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help=f"Default {QUICK.epochs}.")] = None,
    input_size: Annotated[int | None, typer.Option("--input-size", min=32, help=f"Model input in pixels (default {QUICK.input_size}, "
                                                      f"{QUICK_FLOAT32.input_size} on a CPU that trains in float32; "
                                                      f"--full {FULL.input_size}).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    workers: Annotated[int, typer.Option("--workers", "-j", min=0)] = 2,
) -> None:
    """Generate phantoms, train, predict on held-out DICOMs, explain them (the default map method), measure
    radiomic features of the regions of the positive calls, and evaluate classification and
    localization against the phantoms' ground truth."""
    from cxrtool.cli.evaluate import render_table
    from cxrtool.data.phantom import generate_cohort
    from cxrtool.evaluate import evaluate
    from cxrtool.evaluate.localization import evaluate_localization, render_localization
    from cxrtool.explain import ExplainSettings, explain
    from cxrtool.explain.faithfulness import border_band_share
    from cxrtool.io.studies import find_studies
    from cxrtool.models.checkpoint import read_card
    from cxrtool.models.network import mixed_precision, pick_device, precision_name
    from cxrtool.predict import predict
    from cxrtool.radiomics.batch import run_regions
    from cxrtool.radiomics.sources import jobs_from_cam
    from cxrtool.registry import PHANTOM_FINDINGS
    from cxrtool.train.loop import train

    size = FULL if full else quick_size(device)
    n_train = n_train or size.train_images
    epochs = epochs or size.epochs
    input_size = input_size or size.input_size
    started = time.monotonic()
    cohort_dir, study_dir, model_dir = out_dir / "cohort", out_dir / "study", out_dir / "model"
    with handle_interrupt():
        bar = progress_bar()
        with bar:
            task = bar.add_task("phantom cohort (PNG)", total=n_train, status="")
            cohort = generate_cohort(
                cohort_dir, n_images=n_train, size=PHANTOM_SIZE, seed=seed, image_format="png",
                progress=lambda done, total: bar.update(task, completed=done),
            )
            task = bar.add_task("held-out studies (DICOM)", total=n_test, status="")
            study = generate_cohort(
                study_dir, n_images=n_test, size=PHANTOM_SIZE, seed=seed + 10_000, image_format="dicom", first_patient_id=90_001,
                progress=lambda done, total: bar.update(task, completed=done),
            )
        note(f"phantoms: {n_train} training PNGs in {cohort_dir}, {n_test} held-out DICOMs in {study_dir / 'images'}")

        config = demo_config(cohort.data_entry_csv, model_dir, epochs=epochs, seed=seed, device=device, workers=workers,
                             input_size=input_size)
        precision = mixed_precision(pick_device(device))
        note(f"training: {config.architecture} at {input_size} px, {epochs} epochs, "
             + (f"in {precision_name(precision)} mixed precision" if precision is not None
                else "in float32 (no mixed precision on this device)"))
        bar = progress_bar()
        on_event = training_progress(bar, label="train epoch")
        with bar:
            result = train(config, progress=on_event)

        bar = progress_bar()
        with bar:
            task = bar.add_task("predict held-out DICOMs", total=n_test, status="")
            summary = predict(
                [study_dir / "images"], model=result.checkpoint, device=device, workers=workers,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        if summary.failed:
            fail(f"{len(summary.failed)} held-out studies failed to predict: {summary.failed[0][1]}")
        bar = progress_bar()
        with bar:
            task = bar.add_task(f"explain held-out DICOMs ({METHOD_LABEL})", total=n_test, status="")
            explained = explain(
                [study_dir / "images"], model=result.checkpoint, device=device, workers=workers,
                settings=ExplainSettings(findings=tuple(PHANTOM_FINDINGS)),
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
        if explained.failed:
            fail(f"{len(explained.failed)} held-out studies failed to explain: {explained.failed[0][1]}")
        jobs, _, off_chest = jobs_from_cam(find_studies([study_dir / "images"]), positive_only=True)
        if off_chest:
            note(f"{sum(off_chest.values())} CAM regions of positive calls left out of radiomics as not on the chest ("
                 + ", ".join(f"{count} {reason}" for reason, count in off_chest.items()) + ")")
        bar = progress_bar()
        with bar:
            task = bar.add_task("radiomics of the positive calls' CAM regions", total=len(jobs), status="")
            radiomics = run_regions(jobs, study_dir / "images" / "cxrtool_radiomics.csv", workers=workers,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
        predictions_csv = study_dir / "images" / "cxrtool_predictions.csv"
        card = read_card(result.checkpoint)
        report = evaluate(predictions_csv, study.data_entry_csv, thresholds=card.thresholds,
                          out_dir=out_dir / "evaluation", n_boot=200, seed=seed)

    located = evaluate_localization(predictions_csv, study.bbox_csv, out_dir=out_dir / "evaluation")
    show(render_table(report))
    show(render_localization(located))
    show(_radiomics_table(radiomics.table))
    note(f"[bold green]held-out mean AUROC {report.macro.auroc:.3f}[/] on {report.matching['matched']} phantom DICOM studies "
         f"({time.monotonic() - started:.0f} s in all)")
    pointing = ", ".join(f"{name} {located.findings[name].pointing:.2f}" for name in FOCAL_FINDINGS if name in located.findings)
    note(f"[bold]{METHOD_LABEL} pointing game[/] (map peak inside a true box) on the focal findings: {pointing}")
    band = located.overall.border_band
    note(f"  map peaks in the film's border band: {band:.0%} (the band is {border_band_share():.0%} of the film); "
         f"maps marked as lying outside the chest: {located.overall.outside_chest} of {located.overall.mapped}")
    note(f"  model:        {result.checkpoint}  (cxrtool models {result.checkpoint})")
    note(f"  predictions:  {predictions_csv} and a .cxrtool.json beside each DICOM")
    note(f"  explanations: overlays, maps and masks beside each DICOM; {study_dir / 'images' / 'cxrtool_explain.html'}")
    failed = f"; {len(radiomics.failed)} could not be measured, e.g. {radiomics.failed[0][1]}" if radiomics.failed else ""
    note(f"  radiomics:    {radiomics.table} ({radiomics.total} CAM regions{failed})")
    note(f"  evaluation:   {out_dir / 'evaluation'} (evaluation.json, localization.json, curves)")
    note(f"  try:          cxrtool predict {study_dir / 'images'} --model {result.checkpoint} --overwrite")
    raise typer.Exit(EXIT_OK)


def _radiomics_table(table: Path):
    """Per finding: the CAM regions measured and the medians of a few features."""
    import csv
    from statistics import median

    from rich.table import Table

    with open(table, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["status"] == "ok"]
    if not rows:
        return f"Radiomics of the positive calls' {METHOD_LABEL} regions: the model called nothing positive to measure"
    columns = {"area mm2": ("original_shape2D_PixelSurface", "{:,.0f}"), "elongation": ("original_shape2D_Elongation", "{:.2f}"),
               "mean value": ("original_firstorder_Mean", "{:,.0f}"), "GLCM contrast": ("original_glcm_Contrast", "{:.3g}")}
    view = Table(title=f"Radiomics of the positive calls' {METHOD_LABEL} regions on the chest (medians)", title_justify="left")
    view.add_column("finding")
    view.add_column("regions", justify="right")
    for name in columns:
        view.add_column(name, justify="right")
    for finding in sorted({row["finding"] for row in rows}):
        mine = [row for row in rows if row["finding"] == finding]
        cells = [form.format(median(float(row[key]) for row in mine)) for key, form in columns.values()]
        view.add_row(finding, str(len(mine)), *cells)
    return view
