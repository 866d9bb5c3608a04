"""Training data read once: the persistent image cache against the in-memory one and none, in one run.

The shared NIH sample (../shared/data/nih: 388 PNGs of 1024 x 1024 and their rows of
Data_Entry_2017_v2020.csv.gz, 14 findings), ResNet-18 from scratch at 224 px, batch 32,
-j 2, on the CPU: the smallest realistic training run on it. Four runs, each in its own
process (as runs are), in this order:

(a) cold: ``image_cache: auto`` with an empty ``$CXRTOOL_CACHE``: every image hashed, decoded,
    fitted and written to the cache once;
(b) warm: the same command again: every square found there (memory-mapped, nothing decoded);
(c) memory: ``image_cache: memory`` (the in-memory cache before the persistent one): every run
    decodes every image before its first epoch;
(d) off: ``image_cache: off``: each image read and fitted whenever it is drawn, every epoch.

For each: the seconds the image cache took to open (reading the images), the first and
second epochs' own seconds (training and validation, from the run's history), and the
seconds from the call to ``train`` to the end of the first epoch (the label table, the
cache, the model, the epoch); then each against (d). The PNGs are read once beforehand so
that every run finds them in the page cache. With ``--repeat N`` the four runs go round N
times (each round's cache starts empty) and each figure is the best of its N.

    nice -n 10 python benchmarks/train_cache.py                 # about 6 minutes on 2 cores
    python benchmarks/train_cache.py --input-size 128 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
RUNS = {"cold": "auto", "warm": "auto", "memory": "memory", "off": "off"}
LABELS = {"cold": "(a) persistent cache, cold", "warm": "(b) persistent cache, warm", "memory": "(c) in-memory cache",
          "off": "(d) no cache"}


def child(args: argparse.Namespace) -> None:
    """One training run; prints its timings as one JSON line."""
    import cxrtool  # noqa: F401  (first: torchvision made importable before timm)
    import cxrtool.train.loop as loop
    from cxrtool.train.config import load_config

    opened = {}
    image_cache = loop._image_cache

    def timed(*a, **k):
        started = time.perf_counter()
        cache = image_cache(*a, **k)
        opened["seconds"] = time.perf_counter() - started
        return cache

    loop._image_cache = timed
    nih = args.data / "nih"
    config = load_config(None, {"labels": str(nih / "Data_Entry_2017_v2020.csv.gz"), "images": str(nih / "images"),
                                "out": str(args.out), "architecture": args.arch, "input_size": args.input_size,
                                "batch_size": args.batch_size, "epochs": args.epochs, "workers": args.workers,
                                "device": args.device, "seed": 0, "image_cache": RUNS[args.child]})
    marks: dict[str, float] = {}
    started = time.perf_counter()

    def on(event) -> None:
        if event.kind == "epoch" and event.epoch == 1:
            marks["epoch1_end"] = time.perf_counter() - started

    result = loop.train(config, progress=on)
    print(json.dumps({"cache": opened["seconds"], "to_epoch1": marks["epoch1_end"],
                      "epochs": [record["seconds"] for record in result.history]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the four runs; each figure the best of them")
    parser.add_argument("--child", choices=tuple(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from _measure import nih_images  # the script's own folder

    pngs = nih_images(args.data)
    for png in pngs:  # into the page cache: every run reads them from memory
        png.read_bytes()
    rounds: dict[str, list[dict]] = {name: [] for name in RUNS}
    with tempfile.TemporaryDirectory(prefix="cxrtool-train-cache-") as scratch:
        for round_ in range(args.repeat):
            cache = Path(scratch) / f"cache{round_}"  # each round's (a) starts empty
            env = {**os.environ, "CXRTOOL_CACHE": str(cache), "CXRTOOL_NO_PROGRESS": "1"}
            for name in RUNS:
                cmd = [sys.executable, __file__, "--child", name, "--out", str(Path(scratch) / f"{name}{round_}"),
                       "--data", str(args.data), "--arch", args.arch, "--input-size", str(args.input_size),
                       "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.workers),
                       "--device", args.device]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{name} run failed:\n{done.stdout}\n{done.stderr}")
                rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        from cxrtool.train.cache import cache_contents

        on_disk = cache_contents(Path(scratch) / "cache0" / "train-images")
    # The best of the rounds, figure by figure: a burst of load elsewhere hits one round.
    results = {name: {"cache": min(r["cache"] for r in runs), "to_epoch1": min(r["to_epoch1"] for r in runs),
                      "epochs": [min(values) for values in zip(*(r["epochs"] for r in runs), strict=True)]}
               for name, runs in rounds.items()}

    off = results["off"]
    print(f"{len(pngs)} NIH PNGs, {args.arch} at {args.input_size} px, batch {args.batch_size}, -j {args.workers}, "
          f"{args.device}; epochs are training + validation; best of {args.repeat} round(s)")
    print()
    print("| run | reading the images (s) | epoch 1 (s) | start to end of epoch 1 (s) | vs (d) | "
          f"epoch {args.epochs} (s) | vs (d) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, timing in results.items():
        last = timing["epochs"][-1]
        print(f"| {LABELS[name]} | {timing['cache']:.1f} | {timing['epochs'][0]:.1f} | {timing['to_epoch1']:.1f} | "
              f"{timing['to_epoch1'] / off['to_epoch1']:.2f} | {last:.1f} | {last / off['epochs'][-1]:.2f} |")
    if on_disk:
        print()
        print(f"persistent cache: {sum(p.squares for p in on_disk)} squares, "
              f"{sum(p.bytes for p in on_disk) / 2**20:.1f} MiB on disk")


if __name__ == "__main__":
    main()
