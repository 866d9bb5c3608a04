"""What training's mixed precision buys on this machine: a training step of the demo's network
(ResNet-18, output stride 8, LSE head) in float32 against the same step under autocast in the
dtype `cxrtool train` picks for the device (cxrtool.models.network.mixed_precision: bf16 on a
CPU with AMX or AVX-512 BF16, bf16 or fp16 on a GPU; none elsewhere, and then this says so).

    python benchmarks/precision.py                      # the demo's sizes, 96 and 128 px, on the CPU
    python benchmarks/precision.py --sizes 128,192,256 --device cuda

What it does to the model is measured by the demo itself (README, "Training in bf16 on a CPU").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _measure import step_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="96,128", help="input sizes in pixels (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per setting (the best is kept)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from cxrtool.cli.demo import DEMO_ARCHITECTURE, DEMO_OUTPUT_STRIDE, DEMO_PADDING
    from cxrtool.models.network import mixed_precision, precision_name

    dtype = mixed_precision(torch.device(args.device))
    if dtype is None:
        print(f"{args.device}: no mixed precision here (no bf16 units); training runs in float32")
        return
    name = precision_name(dtype)
    print(f"{args.device}, {torch.get_num_threads()} threads: a training step of the demo's network, batch 32")
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        # alternate the two, so that a neighbour's load falls on both alike
        full, mixed = float("inf"), float("inf")
        for _ in range(2):
            full = min(full, step_seconds(DEMO_ARCHITECTURE, size, DEMO_OUTPUT_STRIDE, args.device, DEMO_PADDING,
                                          args.repeat, head="lse"))
            mixed = min(mixed, step_seconds(DEMO_ARCHITECTURE, size, DEMO_OUTPUT_STRIDE, args.device, DEMO_PADDING,
                                            args.repeat, dtype=dtype, head="lse"))
        results.append({"size": size, "float32_s": round(full, 3), f"{name}_s": round(mixed, 3), "speed-up": round(full / mixed, 2)})
        print(f"  {size} px: float32 {full:.3f} s, {name} {mixed:.3f} s = {full / mixed:.2f}x faster")
    if args.json:
        args.json.write_text(json.dumps({"device": args.device, "dtype": name, "steps": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
