"""How well the demo's pipeline localizes at other sizes: Grad-CAM pointing game per finding.

Runs what `cxrtool demo` runs (phantom cohort, training, predict and explain on 300
held-out phantom DICOMs, localization against their true boxes) with the backbone, input
size, output stride, epochs and cohort size given (by default those of `cxrtool demo
--full`), and prints the held-out AUROC and the pointing game of each finding.
`--step-cost` instead times one training step (a batch of 32) of that network against the
`--full` demo's own (ResNet-18 at 128 px, output stride 16), on this device, and prints the
ratio.

    python benchmarks/localization.py --step-cost --input-size 256 --output-stride 8
    python benchmarks/localization.py --device cuda --input-size 256 --output-stride 8 --epochs 40 --train-images 9600 --augment
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def step_seconds(arch: str, size: int, stride: int, device: str, repeat: int = 3) -> float:
    """Best time of one SGD step (forward and backward) on a batch of 32."""
    import torch

    from cxrtool.models.network import CXRClassifier

    model = CXRClassifier(arch, [f"f{i}" for i in range(8)], output_stride=stride).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = torch.randn(32, 1, size, size, device=device)  # grey radiographs: one channel
    best = float("inf")
    for _ in range(repeat + 1):  # the first is a warm-up
        started = time.perf_counter()
        optimiser.zero_grad()
        model(batch).sum().backward()
        optimiser.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return best


def pointing(args: argparse.Namespace, work: Path) -> dict:
    from cxrtool.cli.demo import PHANTOM_SIZE, demo_config
    from cxrtool.data.phantom import generate_cohort
    from cxrtool.evaluate import evaluate
    from cxrtool.evaluate.localization import evaluate_localization
    from cxrtool.explain import ExplainSettings, explain
    from cxrtool.models.checkpoint import read_card
    from cxrtool.predict import predict
    from cxrtool.registry import PHANTOM_FINDINGS
    from cxrtool.train.loop import train

    started = time.perf_counter()
    cohort = generate_cohort(work / "cohort", n_images=args.train_images, size=PHANTOM_SIZE, seed=0, image_format="png")
    study = generate_cohort(work / "study", n_images=300, size=PHANTOM_SIZE, seed=10_000, image_format="dicom",
                            first_patient_id=90_001)
    config = demo_config(cohort.data_entry_csv, work / "model", epochs=args.epochs, seed=0, device=args.device,
                         workers=args.workers, architecture=args.arch, input_size=args.input_size,
                         output_stride=args.output_stride, augment=args.augment)
    trained = time.perf_counter()
    result = train(config)
    training = time.perf_counter() - trained
    images = study.data_entry_csv.parent / "images"
    predict([images], model=result.checkpoint, device=args.device, workers=args.workers)
    explain([images], model=result.checkpoint, device=args.device, workers=args.workers,
            settings=ExplainSettings(findings=tuple(PHANTOM_FINDINGS)))
    predictions = images / "cxrtool_predictions.csv"
    report = evaluate(predictions, study.data_entry_csv, thresholds=read_card(result.checkpoint).thresholds,
                      out_dir=work / "evaluation", n_boot=10, seed=0)
    located = evaluate_localization(predictions, study.bbox_csv, out_dir=work / "evaluation")
    return {
        "macro_auroc": round(report.macro.auroc, 3),
        "auroc": {row.finding: round(row.auroc, 3) for row in report.findings},
        "pointing": {name: round(found.pointing, 2) for name, found in located.findings.items()},
        "training_s": round(training), "total_s": round(time.perf_counter() - started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=2400)
    parser.add_argument("--augment", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-cost", action="store_true", help="time a training step against the demo's instead")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import cxrtool.models.network  # noqa: F401  (torchvision op names before timm)
    from cxrtool.cli.demo import DEMO_ARCHITECTURE, DEMO_OUTPUT_STRIDE, FULL

    setup = f"{args.arch} at {args.input_size} px, output stride {args.output_stride}"
    if args.step_cost:
        demo = step_seconds(DEMO_ARCHITECTURE, FULL.input_size, DEMO_OUTPUT_STRIDE, args.device)
        this = step_seconds(args.arch, args.input_size, args.output_stride, args.device)
        results = {"demo_step_s": round(demo, 3), "step_s": round(this, 3), "ratio": round(this / demo, 2)}
        print(f"training step, batch 32, {args.device}: the demo's network {demo:.3f} s, {setup} {this:.3f} s = {this / demo:.2f}x")
    else:
        with tempfile.TemporaryDirectory(prefix="cxrtool-bench-") as tmp:
            results = pointing(args, Path(tmp))
        print(f"{setup}, {args.epochs} epochs on {args.train_images} phantoms{' with augmentation' if args.augment else ''}, "
              f"{args.device}: held-out mean AUROC {results['macro_auroc']:.3f}; training {results['training_s']} s, "
              f"{results['total_s']} s in all")
        for name, score in results["pointing"].items():
            print(f"  {name:<14} AUROC {results['auroc'].get(name, float('nan')):.3f}  pointing {score:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"setup": {k: v for k, v in vars(args).items() if k != "json"}, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
