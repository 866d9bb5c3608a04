"""Benchmark the Ray engine: images per second of ``predict`` on the local engine, on a Ray
cluster of one node and on one of two nodes, in one run on this machine; Ray's overhead per
image; and the per-image costs (decode, forward, write) that the README's estimate for a
large archive is made from.

Every side is a child process timing one ``predict`` call over the same studies (the real
NIH PNGs in ../shared/data, ``--limit`` of them), into a fresh output folder (nothing done
before), alternating, the best of ``--repeat`` kept:

- local: ``predict FOLDER`` (a decoding worker per core, the model in them);
- ray x1: ``--engine ray`` on a cluster of one node with all the cores
  (:class:`cxrtool.ray_engine.LocalCluster`, started here once, before the timed runs);
- ray x2: the same on a cluster of two nodes, one core each.

Ray's overhead per image is its time less the local time, over the images; its fixed cost
(joining the cluster, starting the pipeline and an actor, opening the model) is measured
with one image.

The per-image costs are measured in this process, one core: decoding and preprocessing
(``StudyInputs``), the model's forward pass in batches of ``--batch-size``, and writing (a
study's output stages: its sidecar and its folder table's row, which run in the driver).

    python benchmarks/ray_engine.py                       # resnet18 at 224 px, 96 images
    python benchmarks/ray_engine.py --limit 200 --repeat 2 --json ray.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cxrtool  # (first: makes torchvision importable)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"


def child(args: argparse.Namespace) -> None:
    """One timed predict call; prints {"items", "seconds"} last."""
    from cxrtool.predict import predict

    engine = "ray" if args.address else "local"
    start = time.perf_counter()
    summary = predict([args.inputs], model=args.model, out=args.out, runtime="torch", device="cpu",
                      batch_size=args.batch_size, workers=args.workers, engine=engine, ray_address=args.address)
    seconds = time.perf_counter() - start
    if summary.failed or summary.predicted != summary.total:
        sys.exit(f"{len(summary.failed)} failed: {summary.failed[:2]}")
    print(json.dumps({"items": summary.predicted, "seconds": seconds, "engine": summary.engine.to_dict()}))


def per_image_costs(inputs: list[Path], model: Path, batch_size: int) -> dict[str, float]:
    """Seconds per image on one core: decode (and preprocess), forward, and the rest."""
    import torch

    from cxrtool.models.network import pick_device
    from cxrtool.models.sources import open_model
    from cxrtool.predict import PREDICT_SETTINGS
    from cxrtool.runner import RunContext, StudyInputs
    from cxrtool.stages import finish_all, standard_stages

    torch.set_num_threads(1)
    scorer = open_model(model, device=pick_device("cpu"), runtime="torch")
    dataset = StudyInputs(inputs, scorer.preprocessings)
    start = time.perf_counter()
    items = [dataset[index] for index in range(len(dataset))]
    decode = (time.perf_counter() - start) / len(items)
    start = time.perf_counter()
    scores = []
    for first in range(0, len(items), batch_size):
        scores.extend(scorer.score(items[first:first + batch_size]))
    forward = (time.perf_counter() - start) / len(items)
    with tempfile.TemporaryDirectory() as out:
        # The output stages as a run has them (its sidecar, its folder table), in the driver.
        context = RunContext(scorer, scorer.device, list(inputs), [Path(out)] * len(inputs), cxrtool.__version__,
                             {"predict": PREDICT_SETTINGS})
        for item, scored in zip(items, scores, strict=True):
            item.result = context.result(item, scored)
        stages = standard_stages(scorer.ref, scorer, cxrtool.__version__)
        start = time.perf_counter()
        for item in items:
            outcome = context.outcome(item)
            for stage in stages:
                stage.study(outcome)
        finish_all(stages)
        write = (time.perf_counter() - start) / len(items)
    return {"decode_s": round(decode, 4), "forward_s": round(forward, 4), "write_s": round(write, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=96, help="NIH images to run over")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--address", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    from _measure import link_inputs, make_model, nih_images, run_measured  # benchmarks/ is the script's own folder

    from cxrtool._workers import cores
    from cxrtool.ray_engine import LocalCluster

    images = nih_images(args.data, args.limit)
    with tempfile.TemporaryDirectory(prefix="bench-ray") as tmp:
        tmp_path = Path(tmp)
        model = make_model(tmp_path / "model.safetensors", args.arch, args.input_size)
        many = link_inputs(images, tmp_path / "many", 1)
        one = link_inputs(images[:1], tmp_path / "one", 1)
        print(f"{len(images)} NIH images, {args.arch} at {args.input_size} px, batch {args.batch_size}, "
              f"{cores()} cores", file=sys.stderr, flush=True)
        costs = per_image_costs(sorted(many.iterdir()), model, args.batch_size)
        print(f"per image, one core: {costs}", file=sys.stderr, flush=True)

        serial = 0

        def timed(label: str, inputs: Path, env: dict, address: str | None) -> dict:
            nonlocal serial
            serial += 1
            cmd = [sys.executable, __file__, "--child", "--inputs", str(inputs), "--model", str(model),
                   "--out", str(tmp_path / f"out{serial}"), "--batch-size", str(args.batch_size)]
            if address:
                cmd += ["--address", address]
            code, _, _, output = run_measured(cmd, env=env, sample_memory=False)
            if code != 0:
                sys.exit(f"{label} failed:\n{output[-3000:]}")
            shutil.rmtree(tmp_path / f"out{serial}", ignore_errors=True)
            run = json.loads(output.strip().splitlines()[-1])
            print(f"  {label:>8}: {run['items']:4d} in {run['seconds']:6.1f} s = {run['items'] / run['seconds']:6.2f}/s "
                  f"{run['engine'].get('decoded_on') and len(run['engine']['decoded_on'])} decode node(s)",
                  file=sys.stderr, flush=True)
            return run

        results: dict[str, dict] = {}
        sides = {"local": (1, None), "ray x1": (1, cores()), "ray x2": (2, 1)}
        for label, (nodes, cpus) in sides.items():
            cluster = LocalCluster(nodes=nodes, cpus=cpus) if cpus else None
            try:
                env = {**(cluster.env if cluster else os.environ), "CXRTOOL_NO_PROGRESS": "1"}
                address = cluster.address if cluster else None
                fixed = min(timed(label, one, env, address)["seconds"] for _ in range(args.repeat))
                best = max((timed(label, many, env, address) for _ in range(args.repeat)),
                           key=lambda run: run["items"] / run["seconds"])
                results[label] = {"images": best["items"], "seconds": round(best["seconds"], 2),
                                  "per_s": round(best["items"] / best["seconds"], 2), "one_image_s": round(fixed, 2),
                                  "nodes": len(set(best["engine"]["decoded_on"]) | set(best["engine"]["modelled_on"]))
                                  if cluster else 1}
            finally:
                if cluster is not None:
                    cluster.stop()

    local = results["local"]
    print(f"\n{len(images)} NIH PNGs, {args.arch} at {args.input_size} px on the CPU, batch {args.batch_size}, "
          f"{cores()} cores (best of {args.repeat})\n")
    print("| engine | images/s | vs local | time for one image (s) | overhead per image (ms) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, run in results.items():
        overhead = (run["seconds"] - run["one_image_s"]) / max(1, run["images"] - 1) - \
            (local["seconds"] - local["one_image_s"]) / max(1, local["images"] - 1)
        print(f"| {label} | {run['per_s']:.2f} | {run['per_s'] / local['per_s']:.2f} | {run['one_image_s']:.1f} | "
              f"{'' if label == 'local' else f'{overhead * 1000:+.0f}'} |")
    print(f"\nper image on one core: decode {costs['decode_s'] * 1000:.0f} ms, forward {costs['forward_s'] * 1000:.0f} ms, "
          f"the rest (sidecar, table: in the driver) {costs['write_s'] * 1000:.0f} ms")
    if args.json:
        args.json.write_text(json.dumps({"sides": results, "per_image": costs, "images": len(images),
                                         "arch": args.arch, "input_size": args.input_size}, indent=1) + "\n")


if __name__ == "__main__":
    main()
