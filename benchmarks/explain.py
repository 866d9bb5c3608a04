"""Benchmark `cxrtool explain` against plain pytorch-grad-cam usage, in one run.

Both sides use the same model and inputs (real NIH PNGs and the DICOMs in ../shared/data)
and map the same 3 findings per image with Grad-CAM. The plain side is the package's
documented usage: per image, per finding, ``cam(input_tensor=x, targets=[ClassifierOutputTarget(f)])``
(a forward and a full backward pass each), then the map resized to the radiograph and an
overlay written with ``show_cam_on_image``. The explain side does its whole job: decoding in
workers, one forward and a cheap backward per finding per batch, maps at the original
resolution (16-bit PNG), masks, boxes, overlays, sidecars and the contact sheet.

    python benchmarks/explain.py                   # CPU, the demo's model size
    python benchmarks/explain.py --device cuda     # on a GPU machine

Prints maps per second for both (best of --repeat alternating runs) and the ratio.
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

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
FINDINGS = ("Effusion", "Nodule", "Cardiomegaly")


def plain_loop(folder: Path, model_path: Path, out: Path, device: str) -> int:
    """pytorch-grad-cam as its README shows it: one image, one target, one call."""
    import cv2
    import numpy as np
    import torch
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cxrtool.io.studies import StudyReadError, find_studies, read_study
    from cxrtool.models.checkpoint import load_checkpoint
    from cxrtool.preprocess import Preprocessing, prepare

    model, card = load_checkpoint(model_path, device=device)
    prep = Preprocessing.from_dict(card.preprocessing)
    out.mkdir(parents=True, exist_ok=True)
    maps = 0
    with GradCAM(model=model, target_layers=[model.get_submodule(model.cam_layer)]) as cam:
        for path in find_studies([folder]):
            try:
                study = read_study(path)
            except StudyReadError:
                continue
            tensor, geometry = prepare(study.pixels, prep)
            x = torch.from_numpy(tensor[None]).to(device)
            height, width = study.shape
            top, left = geometry.pad_y, geometry.pad_x
            inner_h, inner_w = round(height * geometry.scale_y), round(width * geometry.scale_x)
            picture = np.repeat(study.pixels[..., None], 3, axis=2).astype(np.float32)
            for finding in FINDINGS:
                grey = cam(input_tensor=x, targets=[ClassifierOutputTarget(card.findings.index(finding))])[0]
                grey = cv2.resize(grey[top : top + inner_h, left : left + inner_w], (width, height))
                cv2.imwrite(str(out / f"{path.name}.{finding}.map.png"), np.round(grey * 65535).astype(np.uint16))
                cv2.imwrite(str(out / f"{path.name}.{finding}.png"), show_cam_on_image(picture, grey))
                maps += 1
    return maps


def explain_side(folder: Path, model_path: Path, out: Path, device: str, batch_size: int, workers: int | None) -> int:
    from cxrtool.explain import ExplainSettings, explain

    summary = explain([folder], model=model_path, settings=ExplainSettings(findings=FINDINGS), out=out,
                      device=device, batch_size=batch_size, workers=workers)
    return summary.predicted * len(FINDINGS)


def child(args: argparse.Namespace) -> None:
    # Both sides import what they use before the clock starts (the same for both).
    import torch

    import cxrtool.explain.cams
    import cxrtool.explain.run
    import cxrtool.io.studies
    import cxrtool.models.network  # noqa: F401  (torchvision op names before pytorch_grad_cam)

    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    shutil.rmtree(args.out, ignore_errors=True)  # every run writes afresh (nothing skipped)
    started = time.perf_counter()
    if args.mode == "plain":
        n = plain_loop(args.folder, args.model, args.out, args.device)
    else:
        n = explain_side(args.folder, args.model, args.out, args.device, args.batch_size, args.workers)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(json.dumps({"items": n, "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    parser.add_argument("--arch", default="resnet18", help="timm backbone (default: the demo's)")
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--limit", type=int, default=120, help="use only the first N inputs (0: all)")
    parser.add_argument("--copies", type=int, default=1, help="use every input this many times (for fast devices)")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs of each side, alternating; the best counts")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--mode", choices=["plain", "explain"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        child(args)
        return

    from _measure import best_of_alternating, collect_inputs, link_inputs, make_model  # the script's own folder

    inputs = collect_inputs(args.data, None)
    if args.limit:
        # keep the mix: mostly NIH PNGs, and the DICOMs spread through
        pngs = [p for p in inputs if p.suffix == ".png"]
        dicoms = [p for p in inputs if p.suffix != ".png"]
        n_dicom = min(len(dicoms), max(1, args.limit // 10))
        inputs = pngs[: args.limit - n_dicom] + dicoms[:n_dicom]
    with tempfile.TemporaryDirectory(prefix="cxrtool-bench-") as tmp:
        tmp_path = Path(tmp)
        model = make_model(tmp_path / "model.safetensors", args.arch, args.input_size)
        folder = link_inputs(inputs, tmp_path / "in", args.copies)
        commands = {}
        for mode in ("plain", "explain"):
            cmd = [sys.executable, __file__, "--mode", mode, "--folder", str(folder), "--model", str(model),
                   "--out", str(tmp_path / f"out-{mode}"), "--device", args.device, "--batch-size", str(args.batch_size)]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            commands[mode] = cmd
        results = best_of_alternating(commands, args.repeat, env={"CXRTOOL_NO_PROGRESS": "1"})
    ratio = results["explain"]["per_s"] / results["plain"]["per_s"]
    for mode, run in results.items():
        print(f"{mode:>8}: {run['items']} maps in {run['seconds']:6.1f} s = {run['per_s']:7.2f} maps/s")
    print(f"explain over plain pytorch-grad-cam: {ratio:.2f}x ({len(inputs) * args.copies} studies, {len(FINDINGS)} findings each, "
          f"Grad-CAM, {args.arch} at {args.input_size} px, {args.device}; target >= 3x on 2 CPU cores)")
    if args.json:
        args.json.write_text(json.dumps({"arch": args.arch, "input_size": args.input_size, "device": args.device,
                                         "cpus": os.cpu_count(), "studies": len(inputs) * args.copies, "findings_per_study": len(FINDINGS),
                                         "runs": results, "ratio": round(ratio, 2)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
