"""Do the maps point at the finding, and do they explain the model? One place for both.

For a model and held-out studies with true boxes (by default: train the demo's model on its
phantom cohort, exactly as `cxrtool demo` does, and take its 300 held-out DICOMs), every map
method asked for draws each boxed finding's map, and this prints per method and per finding:

- localization, with the same kernels as `cxrtool evaluate --boxes`
  (cxrtool.evaluate.localization): the pointing game with a bootstrap 95% interval, IoU and
  IoBB accuracy at 0.1-0.7 (0.1 and 0.5 printed; all in --json), the share of the map peaks
  in the film's border band (outer 10%, 36% of the area) and the maps explain would mark as
  lying outside the chest;
- faithfulness (cxrtool.explain.faithfulness): insertion AUC minus deletion AUC, higher is
  better, with a bootstrap interval;
- the model-randomisation check (Adebayo et al., 2018): the median rank correlation between
  each map and the map of the same method on the model with every weight re-initialised
  (passes below 0.5);
- with --occlusion-test, which region the network uses: the fall of the finding's logit when
  the true box is inpainted, against when a box of the same size on the map's peak is.

    python benchmarks/localization.py                    # the default demo's model and settings
    python benchmarks/localization.py --full             # the --full demo's (2400 phantoms at 128 px)
    python benchmarks/localization.py --model M.safetensors --study DIR --boxes BBox_List.csv
    python benchmarks/localization.py --methods gradcam@backbone.layer4,occlusion --occlusion-test
    python benchmarks/localization.py --full --device cuda --input-size 256 --epochs 30 --train-images 9600
    python benchmarks/localization.py --step-cost --input-size 256 --output-stride 8
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from _measure import step_seconds

from cxrtool.registry import PADDINGS

DEFAULT_METHODS = "default,gradcam@backbone.layer4,hirescam@backbone.layer4,layercam@backbone.layer2,occlusion"


def train_demo_model(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, float]:
    """The demo's cohort and model (its settings, or those given): checkpoint, study images, boxes, seconds."""
    from cxrtool.cli.demo import FULL, PHANTOM_SIZE, demo_config, quick_size
    from cxrtool.data.phantom import generate_cohort
    from cxrtool.train.loop import train

    size = FULL if args.full else quick_size(args.device)
    cohort = generate_cohort(work / "cohort", n_images=args.train_images or size.train_images, size=PHANTOM_SIZE,
                             seed=args.seed, image_format="png")
    study = generate_cohort(work / "study", n_images=args.test_images, size=PHANTOM_SIZE, seed=args.seed + 10_000,
                            image_format="dicom", first_patient_id=90_001)
    overrides = {key: value for key, value in (("architecture", args.arch), ("output_stride", args.output_stride),
                                               ("augment", args.augment), ("padding", args.padding)) if value is not None}
    config = demo_config(cohort.data_entry_csv, work / "model", epochs=args.epochs or size.epochs, seed=args.seed,
                         device=args.device, workers=args.workers, input_size=args.input_size or size.input_size,
                         **overrides)
    started = time.perf_counter()
    result = train(config)
    return result.checkpoint, study.data_entry_csv.parent / "images", study.bbox_csv, time.perf_counter() - started


def held_out_auroc(network, card, prep, images: Path, labels_csv: Path, device) -> dict[str, float]:
    """Each finding's AUROC on every labelled study of the folder (a labels table beside the boxes)."""
    from sklearn.metrics import roc_auc_score

    from cxrtool.io.studies import read_study
    from cxrtool.preprocess import fit_to_square

    if not labels_csv.is_file():
        return {}
    with open(labels_csv, newline="", encoding="utf-8") as handle:
        labels = {row["Image Index"]: set(row["Finding Labels"].split("|")) for row in csv.DictReader(handle)}
    names = [name for name in sorted(labels) if (images / name).is_file()]
    squares = np.stack([fit_to_square(read_study(images / name).pixels, prep)[0] for name in names])
    probabilities = scores_of(network, card, squares, device)
    found = {}
    for k, finding in enumerate(card.findings):
        truth = [finding in labels[name] for name in names]
        if 0 < sum(truth) < len(truth):
            found[finding] = float(roc_auc_score(truth, probabilities[:, k]))
    return found


def scores_of(network, card, squares: np.ndarray, device, chunk: int = 128) -> np.ndarray:
    """Probabilities (N, findings) of fitted squares in [0, 1]."""
    import torch

    from cxrtool.preprocess import Preprocessing, normalise

    prep = Preprocessing.from_dict(card.preprocessing)
    out = []
    for start in range(0, len(squares), chunk):
        tensor = torch.from_numpy(np.stack([normalise(s, prep) for s in squares[start:start + chunk]])).to(device)
        with torch.no_grad():
            out.append(torch.sigmoid(network(tensor).float()).cpu().numpy())
    return np.concatenate(out)


def measure(args: argparse.Namespace, checkpoint: Path, images: Path, boxes_csv: Path) -> dict:
    import torch

    from cxrtool.data.labels import read_boxes
    from cxrtool.evaluate.localization import LocalizationMetrics
    from cxrtool.explain.cams import make_engine
    from cxrtool.explain.chest import chest_mask, judge_map
    from cxrtool.explain.faithfulness import (
        box_mask,
        faithfulness,
        occlusion_drop,
        randomisation_check,
        randomised_copy,
    )
    from cxrtool.explain.regions import find_regions, peak_point, to_original
    from cxrtool.io.records import FindingMap
    from cxrtool.io.studies import read_study
    from cxrtool.models.checkpoint import load_checkpoint
    from cxrtool.models.network import pick_device
    from cxrtool.preprocess import Preprocessing, fit_to_square, normalise

    device = pick_device(args.device)
    network, card = load_checkpoint(checkpoint, device=str(device))
    prep = Preprocessing.from_dict(card.preprocessing)
    truth: dict[tuple[str, str], list] = defaultdict(list)
    for box in read_boxes(boxes_csv):
        if box.finding in card.findings:
            truth[(Path(box.image).name, box.finding)].append((box.x, box.y, box.w, box.h))
    names = sorted({name for name, _ in truth if (images / name).is_file()})
    if args.limit:
        names = names[: args.limit]
    studies = [read_study(images / name).pixels for name in names]
    fitted = [fit_to_square(pixels, prep) for pixels in studies]
    squares = np.stack([square for square, _ in fitted])
    chests = [chest_mask(pixels) for pixels in studies]
    pairs = [(i, card.findings.index(f)) for i, name in enumerate(names) for f in card.findings if (name, f) in truth]
    print(f"{len(names)} studies with boxes, {len(pairs)} (study, finding) pairs; model {checkpoint.name} "
          f"({card.architecture} at {prep.input_size} px, output stride {card.output_stride})", flush=True)
    auroc = held_out_auroc(network, card, prep, images, boxes_csv.with_name("Data_Entry.csv"), device)
    if auroc:
        print(f"held-out mean AUROC {np.mean(list(auroc.values())):.3f} over the folder's labelled studies: "
              + ", ".join(f"{name} {value:.3f}" for name, value in auroc.items()), flush=True)
    inputs = torch.from_numpy(np.stack([normalise(s, prep) for s in squares])).to(device)

    def finding_score(net, finding: int, logits: bool = False):
        # probabilities for the deletion/insertion curves (as explain --faithfulness records
        # them); logits for the occlusion test's falls, which do not saturate
        def score(batch: np.ndarray) -> np.ndarray:
            tensor = torch.from_numpy(np.stack([normalise(s, prep) for s in batch])).to(device)
            with torch.no_grad():
                out = net(tensor)[:, finding].float()
                return (out if logits else torch.sigmoid(out)).cpu().numpy()
        return score

    def draw(net, method: str, layer: str | None) -> dict[tuple[int, int], np.ndarray]:
        wanted = [[f for i2, f in pairs if i2 == i] for i in range(len(names))]
        maps = {}
        with make_engine(net, method, layer) as engine:
            for start in range(0, len(names), args.batch_size):
                part = wanted[start:start + args.batch_size]
                result = engine(inputs[start:start + args.batch_size], part)
                maps.update({(start + row, f): cam for (row, f), cam in result.maps.items()})
        return maps, engine.layer_name

    randomised = randomised_copy(network, seed=args.seed) if args.randomisation else None
    pictures: list = []
    results: dict = {"auroc": auroc, "methods": {}}
    for spec in args.methods.split(","):
        method, _, layer = spec.partition("@")
        method = method.strip()
        if method == "default":
            from cxrtool.registry import DEFAULT_CAM_METHOD

            method, layer = DEFAULT_CAM_METHOD, ""
        started = time.perf_counter()
        maps, target = draw(network, method, layer or None)
        label = f"{method}@{target}"
        seconds = time.perf_counter() - started
        findings: dict[str, LocalizationMetrics] = {}
        hits: dict[str, bool] = {}  # "study|finding": whether the peak fell in a true box (paired comparisons)
        overlaps: dict[str, list[float]] = {}  # "study|finding": the best IoU and IoBB of the map's regions
        faithful_left = args.faithfulness_pairs
        for (i, f), cam in maps.items():
            name, finding = names[i], card.findings[f]
            original = to_original(cam, fitted[i][1])
            entry: FindingMap | None = None  # (a map that is zero everywhere: no regions, counted unmapped)
            regions = find_regions(original, 0.5)
            if regions is not None:
                x, y = peak_point(original)
                entry = FindingMap(0.0, False, peak=[x, y], regions=[r.record(None) for r in regions.regions],
                                   trust=judge_map(original, chests[i].resized(original.shape), (x, y)))
                if faithful_left:
                    entry.faithfulness = faithfulness(finding_score(network, f), squares[i], cam)
                    faithful_left -= 1
            metrics = findings.setdefault(finding, LocalizationMetrics(finding))
            metrics.add(truth[(name, finding)], entry, 0.0, studies[i].shape)
            hits[f"{name}|{finding}"] = bool(metrics.hits[-1])
            overlaps[f"{name}|{finding}"] = [round(v, 4) for v in metrics.overlaps[-1]]
        overall = LocalizationMetrics("overall")
        for metrics in findings.values():
            overall.merge(metrics)
        record = {"seconds": round(seconds, 1), "overall": overall.to_dict(args.bootstrap, args.seed),
                  "findings": {name: m.to_dict(args.bootstrap, args.seed) for name, m in sorted(findings.items())},
                  "hits": hits, "overlaps": overlaps}
        if randomised is not None:
            shuffled, _ = draw(randomised, method, layer or None)
            keys = [key for key in maps if maps[key].max() > 0]
            check = randomisation_check([maps[k] for k in keys], [shuffled[k] for k in keys])
            record["randomisation"] = {"median_abs_rank_correlation": round(check.median, 3), "passed": check.passed,
                                       "maps": len(keys)}
        if args.occlusion_test:
            drops: dict[str, dict[str, list[float]]] = defaultdict(lambda: {"true_box": [], "peak_box": []})
            for (i, f), cam in maps.items():
                if cam.max() <= 0:
                    continue
                finding, geometry = card.findings[f], fitted[i][1]
                size = squares[i].shape
                true_region = np.zeros(size, dtype=bool)
                for bx, by, bw, bh in truth[(names[i], finding)]:
                    x0, y0 = geometry.to_input(bx, by)
                    x1, y1 = geometry.to_input(bx + bw, by + bh)
                    true_region |= box_mask(size, (x0, y0, x1 - x0, y1 - y0))
                rows, cols = np.nonzero(true_region)
                height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
                py, px = np.unravel_index(int(np.argmax(cam)), cam.shape)
                peak_region = box_mask(size, (px - width / 2, py - height / 2, width, height))
                score = finding_score(network, f, logits=True)
                drops[finding]["true_box"].append(occlusion_drop(score, squares[i], true_region))
                drops[finding]["peak_box"].append(occlusion_drop(score, squares[i], peak_region))
            record["occlusion_test"] = {name: {k: round(float(np.median(v)), 3) for k, v in d.items()} | {"maps": len(d["true_box"])}
                                        for name, d in sorted(drops.items())}
        results["methods"][label] = record
        print_method(label, record, overall, findings, args)
        if args.picture:
            pictures.append((label, maps))
    if args.picture:
        write_picture(args.picture, pictures, names, studies, fitted, truth, card, args.picture_findings.split(","))
    return results


def write_picture(path: Path, pictures: list, names: list[str], studies: list, fitted: list, truth: dict, card,
                  findings: list[str], per_finding: int = 3) -> None:
    """A sheet: a row per method, a column per study (the first boxed ones of each finding),
    each map on its radiograph with the true boxes (white) and the map's peak (green cross)."""
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image

    from cxrtool.explain.regions import to_original

    columns = [(i, card.findings.index(f)) for f in findings for i in
               [i for i, name in enumerate(names) if (name, f) in truth][:per_finding]]
    rows = []
    for label, maps in pictures:
        tiles = []
        for i, f in columns:
            grey = cv2.resize(studies[i].astype(np.float32), (192, 192), interpolation=cv2.INTER_AREA)
            cam = to_original(maps[(i, f)], fitted[i][1])
            small = cv2.resize(cam, (192, 192), interpolation=cv2.INTER_AREA)
            peak = float(small.max())
            tile = show_cam_on_image(np.repeat(grey[..., None], 3, axis=2), small / peak if peak > 0 else small,
                                     use_rgb=False, image_weight=0.6)
            scale = 192 / studies[i].shape[1]
            for x, y, w, h in truth[(names[i], card.findings[f])]:
                cv2.rectangle(tile, (round(x * scale), round(y * scale)), (round((x + w) * scale), round((y + h) * scale)),
                              (255, 255, 255), 1)
            if peak > 0:
                y, x = np.unravel_index(int(np.argmax(small)), small.shape)
                cv2.drawMarker(tile, (int(x), int(y)), (0, 255, 0), cv2.MARKER_CROSS, 14, 2)
            cv2.putText(tile, f"{card.findings[f]}", (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
        row = np.hstack(tiles)
        band = np.zeros((16, row.shape[1], 3), dtype=np.uint8)
        cv2.putText(band, label, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(np.vstack([band, row]))
    cv2.imwrite(str(path), np.vstack(rows))
    print(f"picture: {path}")


def print_method(label: str, record: dict, overall, findings: dict, args: argparse.Namespace) -> None:
    from cxrtool.evaluate.localization import bootstrap_interval
    from cxrtool.explain.faithfulness import border_band_share

    def interval(values) -> str:
        found = bootstrap_interval(values, args.bootstrap, args.seed)
        return f" [{found[0]:.2f}-{found[1]:.2f}]" if found else ""

    line = (f"\n{label} ({record['seconds']} s): pointing {overall.pointing:.2f}{interval(overall.hits)}, "
            f"peaks in border band {overall.border_band:.2f} (area {border_band_share():.2f}), "
            f"outside chest {overall.outside_chest}/{overall.mapped}")
    if overall.faithfulness:
        line += f", faithfulness {overall.mean_faithfulness:.3f}{interval(overall.faithfulness)} ({len(overall.faithfulness)} maps)"
    if "randomisation" in record:
        check = record["randomisation"]
        line += f", randomisation rank corr. {check['median_abs_rank_correlation']:.2f} ({'passes' if check['passed'] else 'FAILS'})"
    print(line)
    print(f"  {'finding':<14}{'pairs':>6}  {'pointing [95% CI]':<19}{'band':>6}{'IoU.1':>7}{'IoU.5':>7}{'IoBB.1':>7}"
          f"{'IoBB.5':>7}{'faith.':>8}" + ("   occlusion: true box / peak box" if "occlusion_test" in record else ""))
    for name, m in sorted(findings.items()):
        faith = f"{m.mean_faithfulness:8.3f}" if m.faithfulness else f"{'':>8}"
        occ = record.get("occlusion_test", {}).get(name)
        occ_text = f"   {occ['true_box']:+.2f} / {occ['peak_box']:+.2f}" if occ else ""
        print(f"  {name:<14}{m.pairs:>6}  {m.pointing:.2f}{interval(m.hits):<15}{m.border_band:>6.2f}"
              f"{m.rate(m.iou_hits[0.1]):>7.2f}{m.rate(m.iou_hits[0.5]):>7.2f}{m.rate(m.iobb_hits[0.1]):>7.2f}"
              f"{m.rate(m.iobb_hits[0.5]):>7.2f}{faith}{occ_text}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a checkpoint to measure (else the demo's is trained)")
    parser.add_argument("--study", type=Path, help="with --model: the folder of its held-out studies")
    parser.add_argument("--boxes", type=Path, help="with --model: their true boxes (NIH BBox_List layout)")
    parser.add_argument("--full", action="store_true", help="the --full demo's cohort and size")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--output-stride", type=int, default=None, choices=[8, 16, 32])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--test-images", type=int, default=300)
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--padding", default=None, choices=PADDINGS, help="how the convolutions pad (default: the demo's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="method[@layer[+layer]] list; 'default' is explain's default (default: %(default)s)")
    parser.add_argument("--faithfulness-pairs", type=int, default=150, help="maps a method whose faithfulness is measured")
    parser.add_argument("--no-randomisation", dest="randomisation", action="store_false")
    parser.add_argument("--occlusion-test", action="store_true")
    parser.add_argument("--limit", type=int, default=0, help="at most this many studies")
    parser.add_argument("--picture", type=Path, default=None, help="also draw a sheet of each method's maps here (PNG)")
    parser.add_argument("--picture-findings", default="Mass,Effusion,Atelectasis", help="the findings the sheet shows")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="train into this folder and keep it")
    parser.add_argument("--step-cost", action="store_true", help="time a training step against the demo's instead")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import cxrtool.models.network  # noqa: F401  (torchvision op names before timm)
    from cxrtool.cli.demo import DEMO_ARCHITECTURE, DEMO_OUTPUT_STRIDE, DEMO_PADDING, QUICK

    if args.step_cost:
        demo = step_seconds(DEMO_ARCHITECTURE, QUICK.input_size, DEMO_OUTPUT_STRIDE, args.device, DEMO_PADDING)
        this = step_seconds(args.arch or DEMO_ARCHITECTURE, args.input_size or QUICK.input_size,
                            args.output_stride or DEMO_OUTPUT_STRIDE, args.device, args.padding or DEMO_PADDING)
        results = {"demo_step_s": round(demo, 3), "step_s": round(this, 3), "ratio": round(this / demo, 2)}
        print(f"training step, batch 32, {args.device}: the demo's network {demo:.3f} s, this one {this:.3f} s = {this / demo:.2f}x")
    elif args.model:
        if not (args.study and args.boxes):
            parser.error("--model needs --study and --boxes")
        results = measure(args, args.model, args.study, args.boxes)
    else:
        with tempfile.TemporaryDirectory(prefix="cxrtool-bench-") as tmp:
            work = args.keep or Path(tmp)
            checkpoint, images, boxes, seconds = train_demo_model(args, work)
            print(f"trained in {seconds:.0f} s: {checkpoint}")
            results = measure(args, checkpoint, images, boxes) | {"training_s": round(seconds)}
    if args.json:
        args.json.write_text(json.dumps({"setup": {k: str(v) for k, v in vars(args).items() if k != "json"}, **results},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
