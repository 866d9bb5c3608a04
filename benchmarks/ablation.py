"""Do the label-aware heads and losses of papers 1 and 2 help? An ablation, with seeds, where
every variant gets the same fair chance.

The protocol, fixed before the numbers were seen:

* the same data, backbone initialisation, data order and budget (epochs, batch, input size)
  for every variant; token maps the attention heads can use (128 px at output stride 16:
  an 8 x 8 map);
* each variant's learning rates chosen from the same small grid (``--grid``: backbone lr
  : head lr) on its *validation* mean AUROC with seed 0, never on the test set; the other
  seeds then train at the chosen point;
* per variant, over the seeds: the held-out mean AUROC, the mean AUROC of the rarest third
  of the findings (by training prevalence), mAP (macro AUPRC) and, on phantoms, the
  pointing game of explain's default map on the held-out boxes; each as the paired
  difference from the baseline (linear + ASL) with a 95% paired-bootstrap interval over
  the test images (or boxed pairs) pooled across seeds
  (:mod:`cxrtool.evaluate.compare`);
* the rule: a variant "helps" (or "hurts") only where the interval excludes 0.

Data: (a) phantoms: a cohort of the phantom generator with its 8 findings (co-occurring as
in radiology, a long tail), tested on a held-out cohort with boxes; (b) the real NIH images
of ../shared/data/nih: a patient-level split, a fixed test third of the patients.

    python benchmarks/ablation.py --data phantoms --seeds 3 --work runs/ablation   # 65 minutes on 2 cores
    python benchmarks/ablation.py --data nih --seeds 3 --epochs 12
    python benchmarks/ablation.py --device cuda --data phantoms --input-size 256 --train-images 8000 --epochs 12  # a GPU

Runs already finished in ``--work`` are read back, not trained again: an interrupted
ablation resumes where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

VARIANTS: dict[str, dict[str, str]] = {
    "linear + ASL": {"head": "linear", "loss": "asl"},
    "LSE + ASL": {"head": "lse", "loss": "asl"},
    "decoder + ASL": {"head": "decoder", "loss": "asl"},
    "LGA + decoder + ASL": {"head": "lga", "loss": "asl"},
    "preset prototypes": {"preset": "prototypes"},
    "preset label-correlation": {"preset": "label-correlation"},
    # paper 4: its classifier alone (focal, alpha 0.25), and with the loop, on the preset's LSE
    # head (whose Grad-CAM, the loop's regions, is its score map) and on the paper's linear head
    "LSE + focal": {"preset": "radiomics-feedback", "loss": "0.7*focal"},
    "preset radiomics-feedback": {"preset": "radiomics-feedback"},
    # the contrast weighted to the classification term's size (NT-Xent starts near ln(2N - 1),
    # about 3.4 at batch 32, the weighted focal term near 0.025): 0.01, not 0.3
    "LSE + focal + 0.01 radiomics": {"preset": "radiomics-feedback", "loss": "0.7*focal+0.01*radiomics"},
    "linear + focal": {"preset": "radiomics-feedback", "head": "linear", "loss": "0.7*focal"},
    "linear + focal + 0.3 radiomics": {"preset": "radiomics-feedback", "head": "linear"},
    "linear + focal + 0.01 radiomics": {"preset": "radiomics-feedback", "head": "linear", "loss": "0.7*focal+0.01*radiomics"},
    # its regions from explain's default map (LayerCAM over the first two stages) instead of
    # Grad-CAM at the last stage, whose regions on the linear head fall on the film's edge by chance
    "linear + focal + 0.01 radiomics (LayerCAM regions)": {"preset": "radiomics-feedback", "head": "linear",
                                                           "loss": "0.7*focal+0.01*radiomics", "feedback_cam": "layercam"},
    # with --labelled-fraction: the images whose labels were held back, given as unlabelled
    "preset radiomics-feedback + unlabelled": {"preset": "radiomics-feedback", "unlabelled": "rest"},
    "LSE + focal + 0.01 radiomics + unlabelled": {"preset": "radiomics-feedback", "loss": "0.7*focal+0.01*radiomics",
                                                  "unlabelled": "rest"},
    # the control: the same runs (the unlabelled images in the batches, the same steps, the
    # batch-norm statistics over them, the cycles) with the contrast weighted to nothing
    "LSE + focal + 1e-6 radiomics + unlabelled (control)": {"preset": "radiomics-feedback", "loss": "0.7*focal+1e-6*radiomics",
                                                            "unlabelled": "rest"},
    "linear + focal + 0.3 radiomics + unlabelled": {"preset": "radiomics-feedback", "head": "linear", "unlabelled": "rest"},
    "linear + focal + 0.01 radiomics + unlabelled": {"preset": "radiomics-feedback", "head": "linear",
                                                     "loss": "0.7*focal+0.01*radiomics", "unlabelled": "rest"},
    "linear + focal + 1e-6 radiomics + unlabelled (control)": {"preset": "radiomics-feedback", "head": "linear",
                                                               "loss": "0.7*focal+1e-6*radiomics", "unlabelled": "rest"},
}
assert not any("," in name for name in VARIANTS), "--variants is a comma-separated list: no commas in a name"
BASELINE = "linear + ASL"
# The papers' ladder, run by default; "LSE + ASL" (train's default head) with --variants all.
PAPER_VARIANTS = "linear + ASL,decoder + ASL,LGA + decoder + ASL,preset prototypes,preset label-correlation"
DEFAULT_GRID = "3e-3:3e-3,3e-3:3e-4"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def phantom_data(work: Path, args: argparse.Namespace) -> tuple[Path, list[Path], Path]:
    """Training labels, test images and test labels of a phantom cohort (with
    ``--labelled-fraction``, the labels of that share of the patients only; see
    :func:`hold_back_labels`)."""
    from cxrtool.data.phantom import generate_cohort

    train = generate_cohort(work / "train", n_images=args.train_images, size=args.phantom_size, seed=0, write_masks=False)
    test = generate_cohort(work / "test", n_images=args.test_images, size=args.phantom_size, seed=10_000,
                           first_patient_id=90_001, write_masks=False)
    labels = train.data_entry_csv
    if args.labelled_fraction < 1:
        labels = hold_back_labels(labels, args.labelled_fraction)
    return labels, sorted((work / "test" / "images").glob("*.png")), test.data_entry_csv


def hold_back_labels(labels: Path, fraction: float) -> Path:
    """A copy of an NIH-style label table with ``fraction`` of its patients (drawn with a
    fixed seed), and beside it ``unlabelled.csv``: the other patients' images, as paths,
    for the variants that learn from unlabelled images. Returns the copy's path."""
    rows = list(csv.reader(open(labels, newline="")))
    header, body = rows[0], rows[1:]
    column = header.index("Patient ID")
    patients = sorted({row[column] for row in body})
    rng = np.random.default_rng(0)
    kept = set(rng.choice(patients, size=max(1, round(fraction * len(patients))), replace=False).tolist())
    out = labels.with_name(f"labelled-{fraction:g}.csv")
    with open(out, "w", newline="") as handle:
        csv.writer(handle).writerows([header] + [row for row in body if row[column] in kept])
    with open(labels.with_name("unlabelled.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path"])
        writer.writerows([[str(labels.parent / "images" / row[0])] for row in body if row[column] not in kept])
    return out


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


def test_targets(test_images: list[Path], test_labels: Path, findings: list[str]) -> np.ndarray:
    """(N, K) labels of the test images, in ``findings`` order (NaN where unknown)."""
    from cxrtool.data.labels import read_labels

    table = read_labels(test_labels, require_images=False)
    row_of = {Path(image).name: i for i, image in enumerate(table.images)}
    columns = [table.findings.index(f) if f in table.findings else None for f in findings]
    out = np.full((len(test_images), len(findings)), np.nan, dtype=np.float64)
    for n, image in enumerate(test_images):
        row = row_of[Path(image).name]
        for k, column in enumerate(columns):
            if column is not None:
                out[n, k] = table.targets[row, column]
    return out


def test_scores(network, card, test_images: list[Path], device: str) -> np.ndarray:
    """A loaded checkpoint's probabilities (N, K) for the test images, read as predict reads them."""
    from localization import scores_of

    from cxrtool.io.studies import read_study
    from cxrtool.preprocess import Preprocessing, fit_to_square

    prep = Preprocessing.from_dict(card.preprocessing)
    squares = np.stack([fit_to_square(read_study(path).pixels, prep)[0] for path in test_images])
    return scores_of(network, card, squares, device)


def localization_pairs(checkpoint: Path, test_images: list[Path], boxes: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Explain's default map on every boxed held-out pair (benchmarks/localization.py's
    kernels), keyed ``study|finding``: ``hits``, whether its peak is in a true box, and
    ``overlaps``, the best IoU and IoBB of its regions with the true boxes."""
    from localization import measure

    options = argparse.Namespace(limit=0, batch_size=32, device=args.device, seed=0, methods="default",
                                 faithfulness_pairs=0, randomisation=False, occlusion_test=False, picture=None,
                                 bootstrap=0)
    with contextlib.redirect_stdout(sys.stderr):
        results = measure(options, checkpoint, test_images[0].parent, boxes)
    (record,) = results["methods"].values()
    return {"hits": record["hits"], "overlaps": record["overlaps"]}


def run_one(name: str, variant: dict, seed: int, point: tuple[float, float], findings: list[str], data: tuple,
            work: Path, args: argparse.Namespace) -> dict:
    """Train one variant at one seed and learning-rate point (or read back a finished run)."""
    from cxrtool.models.checkpoint import load_checkpoint, load_tree
    from cxrtool.train import load_config
    from cxrtool.train.loop import train

    train_csv, test_images, test_labels = data
    lr, head_lr = point
    out = work / f"{name.replace(' ', '_').replace('+', '')}-lr{lr:g}-head{head_lr:g}-seed{seed}"
    if variant.get("unlabelled") == "rest":
        rest = Path(train_csv).with_name("unlabelled.csv")
        if not rest.is_file():
            raise SystemExit(f"variant {name!r} learns from the images whose labels were held back: run it with --labelled-fraction")
        variant = {**variant, "unlabelled": str(rest)}
    done = out / "result.json"
    if done.is_file():
        record = json.loads(done.read_text())
        record["scores"] = np.load(out / "scores.npy")
        record.setdefault("regions_in_border_band", loop_regions_in_band(out / "model", args.input_size))
        return record
    config = load_config(None, {
        "labels": str(train_csv), "findings": findings, "architecture": args.arch, "input_size": args.input_size,
        "output_stride": args.output_stride, "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr,
        "head_lr": head_lr, "seed": seed, "device": args.device, "workers": args.workers, "out": str(out / "model"),
        "augment": args.augment, "head_dim": args.head_dim, "decoder_layers": args.decoder_layers, "val_fraction": 0.15,
        **variant,
    })
    started = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - started
    network, card = load_checkpoint(result.checkpoint, device=args.device)
    state = load_tree(out / "model" / "last_state.safetensors")
    history = state["history"]
    cycles = (state.get("feedback") or {}).get("cycles", [])
    scores = test_scores(network, card, test_images, args.device)
    priors = card.training.get("priors") or {}
    record = {
        "variant": name, "seed": seed, "lr": lr, "head_lr": head_lr,
        "val_auroc": card.metrics["val_mean_auroc"], "positives_train": card.training["positives_train"],
        "text_prior": priors.get("text_encoder") if card.head == "lga" else None,
        "seconds_per_epoch": float(np.mean([h["seconds"] for h in history])), "train_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in network.parameters()),
        "n_unlabelled": result.n_unlabelled,
        # what a feedback cycle cost: seconds each (maps + radiomics), against an epoch's
        "seconds_per_cycle": float(np.mean([c["seconds_maps"] + c["seconds_radiomics"] for c in cycles])) if cycles else None,
        "regions_in_border_band": loop_regions_in_band(out / "model", args.input_size),
        **(localization_pairs(result.checkpoint, test_images, test_labels.with_name("BBox_List.csv"), args)
           if test_labels.with_name("BBox_List.csv").is_file() else {"hits": None, "overlaps": None}),
    }
    np.save(out / "scores.npy", scores)
    done.write_text(json.dumps(record, indent=1) + "\n")
    record["scores"] = scores
    return record


def loop_regions_in_band(model_dir: Path, side: int) -> float | None:
    """The share of the last feedback cycle's regions centred in the film's border band (a
    run with the loop; None otherwise), from the cycle's cache."""
    from cxrtool.models.checkpoint import load_tree
    from cxrtool.train.feedback import FeedbackCache, regions_in_border_band

    state_path = model_dir / "last_state.safetensors"
    saved = (load_tree(state_path).get("feedback") or {}) if state_path.is_file() else {}
    if not saved:
        return None
    cycle = FeedbackCache(model_dir / "feedback").load(int(saved["number"]), str(saved["key"]))
    return None if cycle is None else regions_in_border_band(cycle.boxes[cycle.valid], cycle.side or side)


def macro(metric: str, targets: np.ndarray, scores: np.ndarray) -> float:
    """The mean over the findings of cxrtool's ``auroc`` or ``auprc``; NaN where a finding
    is undefined (one class in a resample)."""
    from cxrtool.evaluate import classification

    values = np.atleast_1d(getattr(classification, metric)(targets, scores))
    return float(np.mean(values)) if not np.isnan(values).any() else float("nan")


# Localization per boxed held-out pair, from explain's default map: the pointing game, and
# the accuracy of the regions' best IoU and IoBB with the true boxes at each threshold.
OVERLAPS = (0.1, 0.3, 0.5, 0.7)


def localization_vectors(run: dict, keys: list[str]) -> dict[str, np.ndarray] | None:
    """A run's per-pair localization outcomes (0/1), in ``keys`` order; None when the run
    has none (NIH, or a run measured before the overlaps were recorded)."""
    if run.get("hits") is None or run.get("overlaps") is None:
        return None
    out = {"pointing": np.array([run["hits"].get(key, False) for key in keys], dtype=np.float64)}
    overlaps = np.array([run["overlaps"].get(key, [0.0, 0.0]) for key in keys], dtype=np.float64)
    for t in OVERLAPS:
        out[f"iou_{t:g}"] = (overlaps[:, 0] > t).astype(np.float64)
        out[f"iobb_{t:g}"] = (overlaps[:, 1] > t).astype(np.float64)
    return out


def summarise(dataset: str, runs: dict[str, list[dict]], targets: np.ndarray, findings: list[str], chosen: dict,
              args: argparse.Namespace) -> list[dict]:
    """Per variant: its metrics over the seeds and its paired differences from the baseline."""
    from cxrtool.evaluate.compare import paired_bootstrap, seed_averaged

    baseline = args.baseline
    prevalence = runs[baseline][0]["positives_train"]
    ranked = sorted((k for k in range(len(findings)) if prevalence.get(findings[k], 0) > 0),
                    key=lambda k: prevalence[findings[k]])
    rare = ranked[: max(1, len(ranked) // 3)]
    metrics = {
        "auroc": lambda t, s: macro("auroc", t, s),
        "rare_auroc": lambda t, s: macro("auroc", t[:, rare], s[:, rare]),
        "map": lambda t, s: macro("auprc", t, s),
    }
    base = runs[baseline]
    keys = sorted(base[0]["hits"]) if base[0].get("hits") else []
    base_local = [localization_vectors(r, keys) for r in base]
    rows = []
    for name, mine in runs.items():
        cycles = [r["seconds_per_cycle"] for r in mine if r.get("seconds_per_cycle")]
        row: dict = {"variant": name, "seeds": len(mine), "lr": chosen[name], "rare_findings": [findings[k] for k in rare],
                     "text_prior": mine[0]["text_prior"], "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in mine])),
                     "seconds_per_cycle": float(np.mean(cycles)) if cycles else None,
                     # the last cycle's regions centred in the film's outer tenth, over the runs whose last
                     # cycle had regions (a run whose maps were all flat has none)
                     "regions_in_border_band": (float(np.mean(bands)) if (bands := [r["regions_in_border_band"] for r in mine
                                                                                    if r.get("regions_in_border_band") is not None])
                                                else None),
                     "runs_with_regions": len(bands),
                     "unlabelled": mine[0].get("n_unlabelled", 0),
                     "parameters": mine[0]["parameters"], "val_auroc": float(np.mean([r["val_auroc"] for r in mine]))}
        for metric, function in metrics.items():
            values = [function(targets, r["scores"]) for r in mine]
            row[metric] = float(np.mean(values))
            row[f"{metric}_sd"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            if name != baseline:
                found = paired_bootstrap(seed_averaged(function, targets, [r["scores"] for r in base], [r["scores"] for r in mine]),
                                         len(targets), n_boot=args.bootstrap, seed=0)
                row[f"{metric}_difference"] = found.to_dict()
        local = [localization_vectors(r, keys) for r in mine]
        if keys and all(v is not None for v in local + base_local):
            for metric in local[0]:
                row[metric] = float(np.mean([v[metric].mean() for v in local]))
                if name != baseline:
                    found = paired_bootstrap(seed_averaged(lambda t, s: float(s.mean()), np.zeros(len(keys)),
                                                           [v[metric] for v in base_local], [v[metric] for v in local]),
                                             len(keys), n_boot=args.bootstrap, seed=0)
                    row[f"{metric}_difference"] = found.to_dict()
        rows.append(row)
    return rows


def _cell(row: dict, metric: str) -> str:
    difference = row.get(f"{metric}_difference")
    if metric not in row:
        return "-"
    text = f"{row[metric]:.3f}"
    if difference is None:
        return text + " (baseline)"
    mark = {"better": " helps", "worse": " hurts"}.get(difference["verdict"], "")
    return f"{text}, {difference['difference']:+.3f} [{difference['low']:+.3f}, {difference['high']:+.3f}]{mark}"


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print("| variant | lr : head lr (val AUROC) | test mean AUROC, difference [95% CI] | rarest third AUROC | mAP | pointing game "
          "| s/epoch (s/feedback cycle) | loop regions in border band | parameters |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        lga = row["variant"].startswith(("LGA", "preset prototypes"))
        name = row["variant"] + (" (learned label embeddings: no sentence encoder)" if lga and not row["text_prior"] else "")
        if row.get("unlabelled"):
            name += f" ({row['unlabelled']} unlabelled images)"
        lr, head_lr = row["lr"]
        band = "-" if row.get("regions_in_border_band") is None else f"{row['regions_in_border_band']:.2f}"
        if row.get("regions_in_border_band") is not None and row["runs_with_regions"] < row["seeds"]:
            band += f" ({row['runs_with_regions']} of {row['seeds']} runs had regions)"
        cost = f"{row['seconds_per_epoch']:.1f}" + (f" ({row['seconds_per_cycle']:.1f})" if row.get("seconds_per_cycle") else "")
        print(f"| {name} | {lr:g} : {head_lr:g} ({row['val_auroc']:.3f}) | {_cell(row, 'auroc')} | {_cell(row, 'rare_auroc')} | "
              f"{_cell(row, 'map')} | {_cell(row, 'pointing')} | {cost} | {band} | {row['parameters'] / 1e6:.2f} M |")
    if any(f"iou_{OVERLAPS[0]:g}" in row for row in rows):
        print("\nLocalization of explain's default map on the boxed held-out pairs: accuracy of the regions' best "
              "overlap with a true box above each threshold, differences as above")
        columns = [f"iou_{t:g}" for t in OVERLAPS] + [f"iobb_{t:g}" for t in OVERLAPS]
        print("| variant | " + " | ".join(c.replace("_", " > ").upper().replace("IOBB", "IoBB").replace("IOU", "IoU")
                                         for c in columns) + " |")
        print("| --- |" + " --- |" * len(columns))
        for row in rows:
            print(f"| {row['variant']} | " + " | ".join(_cell(row, c) for c in columns) + " |")
    sys.stdout.flush()


def add_run_arguments(parser: argparse.ArgumentParser, *, lr_help: str) -> None:
    """The settings every compared run shares, and the data :func:`phantom_data` and
    :func:`nih_data` read (also used by ``zero_shot.py``)."""
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3, help=lr_help)
    parser.add_argument("--train-images", type=int, default=1200, help="phantoms for training and validation")
    parser.add_argument("--test-images", type=int, default=400, help="held-out phantoms")
    parser.add_argument("--phantom-size", type=int, default=128, help="phantom radiographs' side in pixels")
    parser.add_argument("--labelled-fraction", type=float, default=1.0,
                        help="phantoms: keep the labels of this share of the patients; the rest are the unlabelled "
                             "images of the '+ unlabelled' variants (paper 4's semi-supervised setting)")
    parser.add_argument("--test-fraction", type=float, default=0.33, help="NIH: share of patients held out for the test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here, and resume from it (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="write every run and the summaries here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["phantoms", "nih", "both"], default="phantoms")
    parser.add_argument("--variants", default=PAPER_VARIANTS,
                        help="comma-separated variant names, or all: " + "; ".join(VARIANTS) + " (default: %(default)s)")
    add_run_arguments(parser, lr_help="unused: the grid chooses each variant's learning rates")
    parser.add_argument("--grid", default=DEFAULT_GRID, help="backbone lr : head lr points, the same for every variant")
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--decoder-layers", type=int, default=1)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--baseline", default=BASELINE, help="the variant the others are compared with (default: %(default)s)")
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant {unknown[0]!r}; choose from: {'; '.join(VARIANTS)}")
    if args.baseline not in VARIANTS:
        sys.exit(f"unknown baseline {args.baseline!r}; choose from: {'; '.join(VARIANTS)}")
    if args.baseline not in names:
        names.insert(0, args.baseline)
    grid = [tuple(float(x) for x in point.split(":")) for point in args.grid.split(",")]

    import cxrtool  # noqa: F401  (torchvision prepared before timm and grad-cam)
    from cxrtool.registry import PHANTOM_FINDINGS

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cxrtool-ablation-") as scratch:
        root = args.work or Path(scratch)
        for dataset in (["phantoms", "nih"] if args.data == "both" else [args.data]):
            work = root / (dataset if args.labelled_fraction >= 1 else f"{dataset}-labelled{args.labelled_fraction:g}")
            work.mkdir(parents=True, exist_ok=True)
            if dataset == "phantoms":
                data, findings = phantom_data(work, args), list(PHANTOM_FINDINGS)
            else:
                from cxrtool.data.labels import read_labels

                data = nih_data(work, args)
                findings = list(read_labels(data[0], require_images=False).findings)
            targets = test_targets(data[1], data[2], findings)
            runs: dict[str, list[dict]] = {}
            chosen: dict[str, tuple[float, float]] = {}
            for name in names:
                tried = []
                for point in grid:  # seed 0: the grid, judged on validation AUROC only
                    run = run_one(name, VARIANTS[name], 0, point, findings, data, work, args)
                    tried.append(run)
                    print(f"  {dataset} {name} lr {point[0]:g} : {point[1]:g} seed 0: val mean AUROC {run['val_auroc']:.3f}, "
                          f"{run['seconds_per_epoch']:.1f} s/epoch", file=sys.stderr, flush=True)
                best = max(tried, key=lambda r: r["val_auroc"])
                chosen[name] = (best["lr"], best["head_lr"])
                runs[name] = [best]
                for seed in range(1, args.seeds):
                    run = run_one(name, VARIANTS[name], seed, chosen[name], findings, data, work, args)
                    runs[name].append(run)
                    print(f"  {dataset} {name} seed {seed}: val mean AUROC {run['val_auroc']:.3f}", file=sys.stderr, flush=True)
            rows = summarise(dataset, runs, targets, findings, chosen, args)
            title = (f"{dataset}: {args.arch} at {args.input_size} px, output stride {args.output_stride}, {args.epochs} epochs, "
                     f"batch {args.batch_size}, {args.seeds} seeds, {len(data[1])} test images; learning rates chosen per "
                     f"variant from {args.grid} on validation; differences from {args.baseline}, paired bootstrap over the "
                     f"test images (pointing: boxed pairs) pooled across seeds; rarest third: {', '.join(rows[0]['rare_findings'])}"
                     + ("; loop regions in border band: the last feedback cycle's regions centred in the film's outer "
                        "tenth (36% of its area)" if any(row.get("seconds_per_cycle") for row in rows) else ""))
            print_table(title, rows)
            results[dataset] = {"settings": {k: str(v) for k, v in vars(args).items()}, "summary": rows,
                                "runs": {n: [{k: v for k, v in r.items() if k != "scores"} for r in rs] for n, rs in runs.items()}}
            if args.json:
                args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
