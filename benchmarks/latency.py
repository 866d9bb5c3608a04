"""A projection-aware bundle with test-time augmentation: the pipeline against the same
models run one image at a time, in one run.

The bundle has three routes (PA, AP, LATERAL) of two members each, every member a
different random-weight checkpoint (no download: speed does not depend on the weights),
``--tta light`` (3 copies a study), scored on phantom DICOMs whose ViewPosition tags spread
them over the three routes.

* pipeline: ``cxrtool predict`` with the bundle: decoding in worker processes, each route's
  studies batched, every copy of a batch in one forward pass per member, sidecars and
  tables written.
* one at a time: the same bundle, the same scorer and the same TTA in this process: read one
  study, preprocess it, score it (its route's two members, its copies together), write its
  sidecar; then the next.

Per-image latency for the one-at-a-time side is each study's own time (median and 95th
percentile); for the pipeline it is a batch's time divided by its studies (the time a study
costs when studies stream through; the first batch carries the start-up: workers, the
model loads). Both print images/s and the ratio.

    python benchmarks/latency.py                               # 2 CPU cores: resnet18 and regnetx_002 at 224 px
    python benchmarks/latency.py --device cuda --archs convnextv2_tiny,swin_tiny_patch4_window7_224 --images 600

The paper (CXR-LT 2026, Cho et al.) reports under 30 ms an image on one RTX 2080 Ti for its
whole pipeline (ConvNeXt-V2, Swin and CaiT members, TTA).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cxrtool  # noqa: F401  (first: makes torchvision, which timm imports, importable)

ROUTES = ("PA", "AP", "LATERAL")


def make_bundle(folder: Path, archs: list[str], input_size: int, findings: list[str]) -> Path:
    """Six random-weight members (two per route, alternating the architectures) and the bundle file."""
    import torch

    from cxrtool.models.checkpoint import ModelCard, save_checkpoint
    from cxrtool.models.network import CXRClassifier
    from cxrtool.preprocess import Preprocessing

    members, routes = [], {}
    for r, route in enumerate(ROUTES):
        routes[route] = []
        for k in range(2):
            arch = archs[(r * 2 + k) % len(archs)]
            torch.manual_seed(r * 2 + k)
            name = f"{route.lower()}-{k}-{arch}"
            card = ModelCard(arch, findings, Preprocessing(input_size=input_size).to_dict(), name=name)
            save_checkpoint(folder / f"{name}.safetensors", CXRClassifier(arch, findings), card)
            members.append(f"  {name}: {name}.safetensors")
            routes[route].append(name)
    lines = ["name: latency-bundle", "members:", *members, "routes:"]
    lines += [f"  {route}: [{', '.join(names)}]" for route, names in routes.items()]
    lines.append(f"  default: [{routes['PA'][0]}, {routes['AP'][0]}]")
    path = folder / "bundle.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def one_at_a_time(bundle: Path, studies: list[Path], out: Path, device: str, runtime: str) -> list[float]:
    """Each study read, preprocessed, scored and written alone; its seconds."""
    from cxrtool import __version__
    from cxrtool.io.decoded import DecodedStudy
    from cxrtool.io.records import Fingerprint, Sidecar, make_result, relative_source, store_result
    from cxrtool.io.studies import read_study
    from cxrtool.models.network import pick_device
    from cxrtool.models.sources import open_model
    from cxrtool.preprocess import TestTimeAugmentation, prepare

    torch_device = pick_device(device)
    scorer = open_model(bundle, device=torch_device, runtime=runtime, tta=TestTimeAugmentation("light"))
    out.mkdir(parents=True, exist_ok=True)
    seconds = []
    for path in studies:
        started = time.perf_counter()
        study = read_study(path)
        tensors = {key: prepare(study.pixels, prep)[0] for key, prep in scorer.preprocessings.items()}
        item = DecodedStudy(0, tensors=tensors, view_position=study.view_position, view_source="tag")
        scored = scorer.score([item])[0]
        result = make_result(scorer.ref, scored.findings, scored.probabilities, scored.thresholds,
                             settings={"predict": {}}, version=__version__, ensemble=scored.ensemble)
        record = Sidecar(file=path.name, source=relative_source(path, out), fingerprint=Fingerprint.of(path),
                         view_position=study.view_position, image_size=list(study.shape))
        store_result(out, record, result)
        seconds.append(time.perf_counter() - started)
    return seconds


def pipeline(bundle: Path, studies: list[Path], out: Path, device: str, runtime: str, batch_size: int,
             workers: int | None) -> tuple[float, list[float]]:
    """``predict`` over all studies: total seconds, and each batch's seconds per study."""
    from cxrtool.predict import predict
    from cxrtool.preprocess import TestTimeAugmentation

    marks: list[tuple[float, int]] = []

    def progress(done: int, total: int) -> None:
        marks.append((time.perf_counter(), done))

    started = time.perf_counter()
    summary = predict(studies, model=bundle, out=out, device=device, runtime=runtime, batch_size=batch_size,
                      workers=workers, tta=TestTimeAugmentation("light"), progress=progress)
    total = time.perf_counter() - started
    if summary.failed or summary.predicted != len(studies):
        sys.exit(f"the pipeline predicted {summary.predicted} of {len(studies)}: {summary.failed[:2]}")
    # The runner reports results a batch of ``batch_size`` at a time, in order: a batch's time
    # (from the previous batch's last result to its own last) over its studies.
    per_image, previous = [], started
    for first in range(0, len(marks), batch_size):
        block = marks[first : first + batch_size]
        per_image += [(block[-1][0] - previous) / len(block)] * len(block)
        previous = block[-1][0]
    return total, per_image


def main() -> None:
    import numpy as np

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="resnet18,regnetx_002", help="members' timm architectures, in turn")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=120, help="phantom DICOMs, spread over PA, AP and lateral")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runtime", default="torch", help="torch or onnx (CPU), for both sides")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from cxrtool.data.phantom import write_study_folder
    from cxrtool.registry import PHANTOM_FINDINGS

    with tempfile.TemporaryDirectory(prefix="cxrtool-latency-") as scratch:
        root = Path(scratch)
        write_study_folder(root / "studies", n_images=args.images, size=512, transfer_syntaxes=("explicit",))
        studies = sorted((root / "studies").glob("*.dcm"))
        bundle = make_bundle(root, [a.strip() for a in args.archs.split(",")], args.input_size, list(PHANTOM_FINDINGS))
        # A warm-up of each side (imports, the ONNX export, first allocations), not timed.
        one_at_a_time(bundle, studies[:3], root / "warm-single", args.device, args.runtime)
        pipeline(bundle, studies[:3], root / "warm-pipeline", args.device, args.runtime, args.batch_size, args.workers)
        single = one_at_a_time(bundle, studies, root / "single", args.device, args.runtime)
        total, batched = pipeline(bundle, studies, root / "pipeline", args.device, args.runtime, args.batch_size,
                                  args.workers)

    def row(name: str, per_image: list[float], seconds: float) -> dict:
        values = np.array(per_image) * 1000
        return {"side": name, "median_ms": float(np.median(values)), "p95_ms": float(np.percentile(values, 95)),
                "images_per_s": len(studies) / seconds}

    rows = [row("one at a time", single, sum(single)), row("pipeline (cxrtool predict)", batched, total)]
    print(f"\nbundle: 3 routes x 2 members ({args.archs}) at {args.input_size} px, --tta light (3 copies), "
          f"{len(studies)} phantom DICOMs, device {args.device}, runtime {args.runtime}, batch {args.batch_size}")
    print("| side | per-image latency median (ms) | 95th percentile (ms) | images/s |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['side']} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['images_per_s']:.2f} |")
    print(f"throughput ratio, pipeline / one at a time: {rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2,
                                        default=str) + "\n")


if __name__ == "__main__":
    main()
