"""Benchmark `cxrtool radiomics`: regions per second with 1 worker and with all cores, in one run.

Regions are drawn on real NIH PNGs from ../shared/data: per image, one ellipse in each lung
field (sizes vary from image to image, about 40k to 110k pixels, like explain's CAM regions),
stored as one label mask per image (labels 1 and 2), given through a mask CSV. Both sides
run the whole batch loop (`run_regions`: reading, PyRadiomics with cxrtool's default 2D
parameter set, journal, table); one with a single worker (in process), the other with one
worker process per core.

    python benchmarks/radiomics_workers.py                # 24 images, 48 regions
    python benchmarks/radiomics_workers.py --images 60

Prints regions per second for both (best of --repeat alternating runs), the scaling, and the
time per region on real NIH images with the default parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This file's name would hide the PyRadiomics package (``import radiomics``) while its folder
# leads sys.path: move the folder to the end, where _measure is still found.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE] + [str(HERE)]
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"


def write_regions(images: list[Path], folder: Path, seed: int = 0) -> Path:
    """One mask PNG per image (left lung 1, right lung 2) and the CSV naming them."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["image,mask,label"]
    for index, image in enumerate(images):
        shape = cv2.imread(str(image), cv2.IMREAD_UNCHANGED).shape[:2]
        height, width = shape
        mask = np.zeros(shape, np.uint8)
        for label, centre_x in ((1, 0.3), (2, 0.7)):
            axes = (int(width * rng.uniform(0.08, 0.13)), int(height * rng.uniform(0.15, 0.25)))
            centre = (int(width * (centre_x + rng.uniform(-0.03, 0.03))), int(height * rng.uniform(0.4, 0.5)))
            cv2.ellipse(mask, centre, axes, 0, 0, 360, label, thickness=-1)
        name = f"mask{index:03d}.png"
        cv2.imwrite(str(folder / name), mask)
        rows += [f"{image},{name},1", f"{image},{name},2"]
    csv_path = folder / "regions.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return csv_path


def child(args: argparse.Namespace) -> None:
    # Both sides import what they use before the clock starts (the same for both).
    from radiomics import featureextractor  # noqa: F401

    from cxrtool.radiomics.batch import run_regions
    from cxrtool.radiomics.sources import jobs_from_csv

    jobs = jobs_from_csv(args.regions)
    out = args.out
    for stale in (out, out.with_name(out.name + ".journal.jsonl")):
        stale.unlink(missing_ok=True)  # every run measures afresh (nothing resumed)
    workers = 0 if args.mode == "one" else (os.cpu_count() or 1)  # 0: in this process
    started = time.perf_counter()
    summary = run_regions(jobs, out, workers=workers)
    seconds = time.perf_counter() - started
    if summary.failed:
        sys.exit(f"{len(summary.failed)} regions failed, e.g. {summary.failed[0]}")
    print(json.dumps({"items": summary.measured, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--images", type=int, default=24, help="NIH images to use (two regions each)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each side, alternating; the best counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--mode", choices=["one", "all"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--regions", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return

    from _measure import best_of_alternating, nih_images  # the script's own folder

    images = nih_images(args.data, args.images)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="cxrtool-bench-") as tmp:
        regions = write_regions(images, Path(tmp) / "masks")
        commands = {
            mode: [sys.executable, __file__, "--mode", mode, "--regions", str(regions), "--out", str(Path(tmp) / f"{mode}.csv")]
            for mode in ("one", "all")
        }
        results = best_of_alternating(commands, args.repeat, env={"CXRTOOL_NO_PROGRESS": "1"})
    scaling = results["all"]["per_s"] / results["one"]["per_s"]
    per_region = 1.0 / results["one"]["per_s"]
    labels = {"one": "in process", "all": f"{cores} workers"}
    for mode, run in results.items():
        print(f"{labels[mode]:>10}: {run['items']} regions in {run['seconds']:6.1f} s = {run['per_s']:6.2f} regions/s")
    print(f"scaling with {cores} workers: {scaling:.2f}x (target >= 1.7x on 2 cores)")
    print(f"time per region on real NIH images, default parameters (Original, LoG sigma 1 and 3, Wavelet; all classes), "
          f"1 worker: {per_region:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"cpus": cores, "images": len(images), "regions": 2 * len(images), "runs": results,
                                         "scaling": round(scaling, 2), "seconds_per_region": round(per_region, 3)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
