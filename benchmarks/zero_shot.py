"""Zero-shot findings, measured: hold findings out of training, score them from their
descriptions, and set the result against chance and against a supervised model.

For each seed:

* dual branch: ``--preset dual-branch`` (a text-space projection trained by the align term,
  1.5 x ASL on the classification head) on every finding but the held-out ones;
  ``predict --prompts`` then scores the held-out findings from their descriptions
  (cxrtool's own ``findings.yaml``, ``Name: description`` against ``no name``);
* supervised: a linear head with ASL trained with the held-out findings' labels (what
  zero-shot would be if the labels existed), same backbone, size, epochs and seed.

Both are scored on the held-out test images by ``cxrtool evaluate``. Chance is AUROC 0.5 and
mAP equal to the finding's test prevalence. A third column asks whether the text projection
does more than point at a correlated finding the model did learn: the same dual-branch
model's probability of the seen finding whose description is nearest the held-out one's in
the sentence encoder's space, scored against the held-out finding's labels; and, as an
oracle bound on any such proxy, the best seen finding chosen on the test labels themselves.

    python benchmarks/zero_shot.py --seeds 3                        # phantoms, Mass and Edema held out
    python benchmarks/zero_shot.py --data nih --held-out Effusion,Cardiomegaly --input-size 128 --epochs 10 --batch-size 16
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
from ablation import add_run_arguments, nih_data, phantom_data, test_targets  # the same data and shared settings

import cxrtool  # noqa: F401  (first: makes torchvision, which timm imports, importable)


def prompts_for(held_out: list[str], folder: Path) -> Path:
    """A prompts file: each held-out finding's description from cxrtool's own file."""
    from cxrtool.models.text import finding_texts, negative_prompt, read_descriptions

    texts, missing = finding_texts(held_out, read_descriptions())
    if missing:
        sys.exit(f"no description for {', '.join(missing)} in cxrtool/resources/findings.yaml")
    lines = []
    for name, text in zip(held_out, texts, strict=True):
        lines += [f"{json.dumps(name)}:", f"  positive: [{json.dumps(text)}]", f"  negative: [{json.dumps(negative_prompt(name))}]"]
    path = folder / "prompts.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(kind: str, seed: int, data: tuple, held_out: list[str], work: Path, args: argparse.Namespace) -> dict:
    from cxrtool.evaluate import evaluate
    from cxrtool.models.text import read_prompts
    from cxrtool.predict import predict
    from cxrtool.train import load_config
    from cxrtool.train.loop import train

    train_csv, test_images, test_labels = data
    everything = findings_of(train_csv, args)
    seen = [f for f in everything if f not in held_out]
    out = work / f"{kind}-seed{seed}"
    settings = {"labels": str(train_csv), "architecture": args.arch, "input_size": args.input_size, "epochs": args.epochs,
                "output_stride": args.output_stride,
                "batch_size": args.batch_size, "lr": args.lr, "seed": seed, "device": args.device,
                "workers": args.workers, "out": str(out / "model"), "val_fraction": 0.15}
    if kind == "zero-shot":
        settings.update(preset="dual-branch", findings=seen)
    else:
        settings.update(head="linear", loss="asl", findings=everything)
    result = train(load_config(None, settings))
    prompts = read_prompts(prompts_for(held_out, work)) if kind == "zero-shot" else None
    predict(test_images, model=result.checkpoint, out=out / "test", device=args.device, workers=args.workers,
            runtime="torch", zero_shot=prompts)
    report = evaluate(out / "test", test_labels, model=result.checkpoint, n_boot=0, out_dir=out / "eval")
    rows = {row.finding: row for row in report.findings}
    with open(out / "test" / "cxrtool_predictions.csv", newline="") as handle:
        by_name = {Path(row["file"]).name: row for row in csv.DictReader(handle)}
    record = {"kind": kind, "seed": seed,
              # each held-out finding's probability per test image, in the test images' order (the pairing)
              "scores": {f: [float(by_name[Path(p).name][f]) for p in test_images] for f in held_out},
              "auroc": {f: rows[f].auroc for f in held_out}, "map": {f: rows[f].auprc for f in held_out},
              "prevalence": {f: rows[f].positives / max(1, rows[f].n) for f in held_out}}
    if kind == "zero-shot":
        record["nearest"] = nearest_seen(held_out, seen, by_name, test_labels)
    return record


def findings_of(train_csv: Path, args: argparse.Namespace) -> list[str]:
    """The findings trained on: the phantoms' own 8 (their label table spells NIH's 14, six
    of them never positive), or the NIH file's."""
    from cxrtool.data.labels import read_labels
    from cxrtool.registry import PHANTOM_FINDINGS

    return list(PHANTOM_FINDINGS) if args.data == "phantoms" else list(read_labels(train_csv, require_images=False).findings)


def nearest_seen(held_out: list[str], seen: list[str], scores: dict[str, dict], test_labels: Path) -> dict:
    """For each held-out finding, the AUROC against its labels of the model's probability of
    a seen finding: the one nearest it in text, and (an oracle, chosen on the test labels)
    the best one. ``scores``: the predictions table's rows by study file name."""
    from cxrtool.data.labels import read_labels
    from cxrtool.evaluate.metrics import auroc
    from cxrtool.models.text import encode, finding_texts, read_descriptions

    descriptions = read_descriptions()
    held_vectors = encode(finding_texts(held_out, descriptions)[0])
    seen_vectors = encode(finding_texts(seen, descriptions)[0])
    nearest = [seen[int(i)] for i in (held_vectors @ seen_vectors.T).argmax(axis=1)]
    table = read_labels(test_labels, require_images=False)
    keep = [i for i, image in enumerate(table.images) if Path(image).name in scores]
    result = {}
    for finding, proxy in zip(held_out, nearest, strict=True):
        truth = table.targets[keep, table.findings.index(finding)]
        by_seen = {name: float(auroc(truth, np.array([float(scores[Path(table.images[i]).name][name]) for i in keep])))
                   for name in seen}
        best = max(by_seen, key=by_seen.get)
        result[finding] = {"finding": proxy, "auroc": by_seen[proxy], "best_finding": best, "best_auroc": by_seen[best]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["phantoms", "nih"], default="phantoms")
    parser.add_argument("--held-out", default="Mass,Edema", help="findings left out of the dual branch's training")
    add_run_arguments(parser, lr_help="the same for both")
    args = parser.parse_args()
    held_out = [name.strip() for name in args.held_out.split(",") if name.strip()]

    with tempfile.TemporaryDirectory(prefix="cxrtool-zero-shot-") as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        data = phantom_data(work, args) if args.data == "phantoms" else nih_data(work, args)
        targets = test_targets(data[1], data[2], held_out)
        runs = []
        for seed in range(args.seeds):
            for kind in ("zero-shot", "supervised"):
                runs.append(run(kind, seed, data, held_out, work, args))
                shown = ", ".join(f"{f} {runs[-1]['auroc'][f]:.3f}" for f in held_out)
                print(f"  seed {seed} {kind}: AUROC {shown}", file=sys.stderr, flush=True)

    def stat(kind: str, metric: str, finding: str) -> tuple[float, float]:
        values = np.array([r[metric][finding] for r in runs if r["kind"] == kind], dtype=float)
        values = values[~np.isnan(values)]
        return (float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0) if len(values) else (math.nan, 0.0)

    from cxrtool.evaluate.compare import paired_bootstrap, seed_averaged
    from cxrtool.evaluate.metrics import auroc

    print(f"\n{args.data}: {args.arch} at {args.input_size} px, output stride {args.output_stride}, {args.epochs} epochs, "
          f"lr {args.lr}, {args.seeds} seeds; held out of the dual branch's training: {', '.join(held_out)}")
    print("| finding | test prevalence (chance mAP) | zero-shot AUROC (sd) | zero-shot mAP | nearest seen finding by text: AUROC (sd) "
          "| best seen finding (oracle): AUROC | supervised AUROC (sd) | supervised mAP | zero-shot - supervised AUROC [95% CI] |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    differences: dict[str, dict] = {}
    for finding in held_out:
        prevalence = runs[0]["prevalence"][finding]
        za, zs = stat("zero-shot", "auroc", finding)
        sa, ss = stat("supervised", "auroc", finding)
        proxies = np.array([r["nearest"][finding]["auroc"] for r in runs if r["kind"] == "zero-shot"], dtype=float)
        names = sorted({r["nearest"][finding]["finding"] for r in runs if r["kind"] == "zero-shot"})
        spread = float(proxies.std(ddof=1)) if len(proxies) > 1 else 0.0
        best = np.array([r["nearest"][finding]["best_auroc"] for r in runs if r["kind"] == "zero-shot"], dtype=float)
        best_names = sorted({r["nearest"][finding]["best_finding"] for r in runs if r["kind"] == "zero-shot"})
        column = held_out.index(finding)
        pick = [np.asarray(r["scores"][finding]) for r in runs if r["kind"] == "supervised"], \
            [np.asarray(r["scores"][finding]) for r in runs if r["kind"] == "zero-shot"]
        found = paired_bootstrap(seed_averaged(lambda t, s: float(auroc(t, s)), targets[:, column], *pick), len(targets),
                                 n_boot=1000, seed=0)
        differences[finding] = found.to_dict()
        print(f"| {finding} | {prevalence:.3f} | {za:.3f} ({zs:.3f}) | {stat('zero-shot', 'map', finding)[0]:.3f} | "
              f"{'/'.join(names)}: {np.nanmean(proxies):.3f} ({spread:.3f}) | {'/'.join(best_names)}: {np.nanmean(best):.3f} | "
              f"{sa:.3f} ({ss:.3f}) | {stat('supervised', 'map', finding)[0]:.3f} | "
              f"{found.estimate:+.3f} [{found.low:+.3f}, {found.high:+.3f}] |")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "zero_shot_minus_supervised": differences},
                                        indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
