"""What a feedback cycle of paper 4's radiomics loop costs, against an epoch, in one run.

The demo's cohort and settings (2000 phantoms, ResNet-18 at 96 px, output stride 8, batch
32; the demo's own `demo_config`), trained with ``--preset radiomics-feedback`` for two
epochs, so that one cycle runs between them: its maps (a frozen copy of the network, the
cycle's map method) and its radiomics (PyRadiomics in worker processes) are timed by the
loop itself, and set against the first epoch's time (training and validation, before any
cycle). Once at each ``--fractions`` (the share of the training images a cycle measures;
the default 0.5, and 1, the paper's every image every cycle).

    python benchmarks/feedback_cost.py                     # about 6 minutes on 2 cores
    python benchmarks/feedback_cost.py --fractions 0.5 --train-images 600

The issue's bound: a cycle at most a third of an epoch at the demo's settings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-images", type=int, default=2000)
    parser.add_argument("--fractions", default="0.5,1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="keep the cohort and runs here (default: a temporary folder)")
    args = parser.parse_args()

    import cxrtool  # noqa: F401  (torchvision prepared before timm and grad-cam)
    from cxrtool.cli.demo import PHANTOM_SIZE, demo_config
    from cxrtool.data.phantom import generate_cohort
    from cxrtool.models.checkpoint import load_tree
    from cxrtool.registry import PRESETS
    from cxrtool.train.loop import train

    with tempfile.TemporaryDirectory(prefix="cxrtool-feedback-cost-") as scratch:
        root = args.work or Path(scratch)
        cohort = generate_cohort(root / "cohort", n_images=args.train_images, size=PHANTOM_SIZE, seed=0, image_format="png",
                                 write_masks=False)
        print("| cycle measures | epoch (s) | cycle (s): maps + radiomics | regions measured (dropped) | cycle / epoch |")
        print("| --- | --- | --- | --- | --- |")
        for fraction in (float(f) for f in args.fractions.split(",")):
            out = root / f"fraction{fraction:g}"
            config = demo_config(cohort.data_entry_csv, out, epochs=2, seed=0, device=args.device, workers=args.workers)
            for key, value in PRESETS["radiomics-feedback"].items():
                setattr(config, key, value)
            config.preset, config.feedback_fraction = "radiomics-feedback", fraction
            train(config)
            state = load_tree(out / "last_state.safetensors")
            epoch = state["history"][0]["seconds"]
            (cycle,) = state["feedback"]["cycles"]
            seconds = cycle["seconds_maps"] + cycle["seconds_radiomics"]
            print(f"| {fraction:.0%} of {cycle['pool']} images | {epoch:.1f} | "
                  f"{seconds:.1f}: {cycle['seconds_maps']:.1f} + {cycle['seconds_radiomics']:.1f} | "
                  f"{cycle['refreshed'] - cycle['dropped']} ({cycle['dropped']}) | {seconds / epoch:.2f} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
