"""Do the label-aware heads and losses of papers 1 and 2 help? An ablation, with seeds.

Trains every variant with the same backbone, input size, epochs, batch, learning rate and
seeds (no variant is tuned: the same settings for all), on

(a) phantoms: a cohort of the phantom generator (findings that co-occur as in radiology,
    a long tail), tested on a held-out phantom cohort;
(b) the real NIH images of ../shared/data/nih: a patient-level split, a fixed test set of
    about a third of the patients, the rest for training and validation.

For each variant it prints, over the seeds: the test mean AUROC (mean and standard
deviation over seeds, and the bootstrap 95% interval averaged over seeds), the mean AUROC
of the rarest third of the findings (by training prevalence), mAP (macro AUPRC), macro F1
at the checkpoint's thresholds, seconds per training epoch and the parameter count.

    python benchmarks/ablation.py --data phantoms --seeds 3
    python benchmarks/ablation.py --data nih --seeds 3 --epochs 12 --input-size 128
    python benchmarks/ablation.py --device cuda --data phantoms --train-images 8000 --input-size 128 --epochs 20
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS: dict[str, dict[str, str]] = {
    "linear + BCE": {"head": "linear", "loss": "bce"},
    "linear + ASL": {"head": "linear", "loss": "asl"},
    "decoder + ASL": {"head": "decoder", "loss": "asl"},
    "LGA + decoder + ASL": {"head": "lga", "loss": "asl"},
    "preset prototypes": {"preset": "prototypes"},
    "preset label-correlation": {"preset": "label-correlation"},
}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def phantom_data(work: Path, args: argparse.Namespace) -> tuple[Path, list[Path], Path]:
    """Training labels, test images and test labels of a phantom cohort."""
    from cxrtool.data.phantom import generate_cohort

    train = generate_cohort(work / "train", n_images=args.train_images, size=args.phantom_size, seed=0, write_masks=False)
    test = generate_cohort(work / "test", n_images=args.test_images, size=args.phantom_size, seed=10_000,
                           first_patient_id=90_001, write_masks=False)
    return train.data_entry_csv, sorted((work / "test" / "images").glob("*.png")), test.data_entry_csv


def nih_data(work: Path, args: argparse.Namespace) -> tuple[Path, list[Path], Path]:
    """The real NIH images: a generic label CSV of the training patients, the test images."""
    from cxrtool.data.labels import patient_split, read_labels

    labels = SHARED / "nih" / "Data_Entry_2017_v2020.csv.gz"
    table = read_labels(labels, image_root=SHARED / "nih" / "images")
    rest, test = patient_split(table, val_fraction=args.test_fraction, seed=12345)
    train_csv = work / "train.csv"
    with open(train_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "patient_id", *table.findings])
        for i in rest:
            values = ["" if math.isnan(v) else int(v) for v in table.targets[i]]
            writer.writerow([str(table.resolve_image(i)), table.patients[i], *values])
    return train_csv, [table.resolve_image(i) for i in test], labels


def run_one(name: str, variant: dict, seed: int, data: tuple, work: Path, args: argparse.Namespace) -> dict:
    from cxrtool.evaluate import evaluate
    from cxrtool.models.checkpoint import load_checkpoint, load_tree
    from cxrtool.predict import predict
    from cxrtool.train import load_config
    from cxrtool.train.loop import train

    train_csv, test_images, test_labels = data
    out = work / f"{name.replace(' ', '_').replace('+', '')}-seed{seed}"
    config = load_config(None, {
        "labels": str(train_csv), "architecture": args.arch, "input_size": args.input_size, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "seed": seed, "device": args.device, "workers": args.workers,
        "out": str(out / "model"), "augment": args.augment, "head_dim": args.head_dim, "decoder_layers": args.decoder_layers,
        "val_fraction": 0.15, **variant,
    })
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    history = load_tree(out / "model" / "last_state.safetensors")["history"]
    model, card = load_checkpoint(result.checkpoint)
    predict(test_images, model=result.checkpoint, out=out / "test", device=args.device, workers=args.workers)
    report = evaluate(out / "test", test_labels, model=result.checkpoint, n_boot=args.bootstrap, out_dir=out / "eval")
    findings = {row.finding: row for row in report.findings}
    prevalence = card.training["positives_train"]
    ranked = sorted((f for f in findings if not math.isnan(findings[f].auroc)), key=lambda f: prevalence.get(f, 0))
    rare = ranked[: max(1, len(ranked) // 3)]
    return {
        "variant": name, "seed": seed,
        "auroc": report.macro.auroc, "auroc_ci": list(report.macro.ci.get("auroc", (math.nan, math.nan))),
        "rare_auroc": float(np.mean([findings[f].auroc for f in rare])), "rare_findings": rare,
        "map": report.macro.auprc, "f1": report.macro.f1,
        "per_finding_auroc": {f: row.auroc for f, row in findings.items()},
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])), "train_seconds": round(seconds, 1),
        "parameters": int(sum(p.numel() for p in model.parameters())),
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(run["variant"] for run in runs):
        mine = [run for run in runs if run["variant"] == name]
        auroc = np.array([run["auroc"] for run in mine])
        rows.append({
            "variant": name, "seeds": len(mine),
            "auroc": float(auroc.mean()), "auroc_sd": float(auroc.std(ddof=1)) if len(mine) > 1 else 0.0,
            "auroc_ci": [float(np.mean([run["auroc_ci"][0] for run in mine])), float(np.mean([run["auroc_ci"][1] for run in mine]))],
            "rare_auroc": float(np.mean([run["rare_auroc"] for run in mine])),
            "rare_auroc_sd": float(np.std([run["rare_auroc"] for run in mine], ddof=1)) if len(mine) > 1 else 0.0,
            "map": float(np.mean([run["map"] for run in mine])), "f1": float(np.mean([run["f1"] for run in mine])),
            "seconds_per_epoch": float(np.mean([run["seconds_per_epoch"] for run in mine])),
            "parameters": mine[0]["parameters"],
        })
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| variant | seeds | test mean AUROC (sd) | bootstrap 95% CI | rarest third AUROC (sd) | mAP | macro F1 | s/epoch | parameters |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['seeds']} | {row['auroc']:.3f} ({row['auroc_sd']:.3f}) | "
              f"{row['auroc_ci'][0]:.3f}-{row['auroc_ci'][1]:.3f} | {row['rare_auroc']:.3f} ({row['rare_auroc_sd']:.3f}) | "
              f"{row['map']:.3f} | {row['f1']:.3f} | {row['seconds_per_epoch']:.1f} | {row['parameters'] / 1e6:.2f} M |")
    sys.stdout.flush()


def add_run_arguments(parser: argparse.ArgumentParser, *, lr_help: str) -> None:
    """The settings every compared run shares, and the data :func:`phantom_data` and
    :func:`nih_data` read (also used by ``zero_shot.py``)."""
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help=lr_help)
    parser.add_argument("--train-images", type=int, default=1200, help="phantoms for training and validation")
    parser.add_argument("--test-images", type=int, default=400, help="held-out phantoms")
    parser.add_argument("--phantom-size", type=int, default=128, help="phantom radiographs' side in pixels")
    parser.add_argument("--test-fraction", type=float, default=0.33, help="NIH: share of patients held out for the test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the summaries here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["phantoms", "nih", "both"], default="both")
    parser.add_argument("--variants", default="all", help="comma-separated variant names, or all: " + "; ".join(VARIANTS))
    add_run_arguments(parser, lr_help="the same for every variant")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--decoder-layers", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=500)
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]!r}; choose from: {'; '.join(VARIANTS)}")

    import cxrtool  # noqa: F401  (torchvision prepared before timm and grad-cam)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cxrtool-ablation-") as scratch:
        root = args.work or Path(scratch)
        for dataset in (["phantoms", "nih"] if args.data == "both" else [args.data]):
            work = root / dataset
            work.mkdir(parents=True, exist_ok=True)
            data = phantom_data(work, args) if dataset == "phantoms" else nih_data(work, args)
            runs = []
            for seed in range(args.seeds):
                for name in names:
                    run = run_one(name, VARIANTS[name], seed, data, work, args)
                    runs.append(run)
                    print(f"  {dataset} seed {seed} {name}: test mean AUROC {run['auroc']:.3f}, rarest third {run['rare_auroc']:.3f}, "
                          f"{run['seconds_per_epoch']:.1f} s/epoch", file=sys.stderr, flush=True)
            rows = summarise(runs)
            title = (f"{dataset}: {args.arch} at {args.input_size} px, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
                     f"{args.seeds} seeds, {len(data[1])} test images")
            print_table(title, rows)
            results[dataset] = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "summary": rows}
            if args.json:
                args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
