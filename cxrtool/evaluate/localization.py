"""Localization, measured: the boxes and maps ``explain`` wrote against radiologists' boxes.

The protocol of the ChestX-ray14 paper (Wang et al., 2017): for each (image, finding) with
a true box, the localization is correct at threshold T when one of explain's region boxes
for that finding overlaps a true box by IoU > T (intersection over union) or by IoBB > T
(intersection over the *predicted* box's area), T = 0.1 ... 0.7. And the pointing game
(Zhang et al., 2016): a hit when the map's peak lies inside a true box, optionally within a
tolerance in pixels. Pairs that explain did not map count as misses, and are counted.

Beside them, what tells a map that points at the finding from one that points at the film:
the share of peaks in the film's border band (its outer tenth on every side, 36% of the
area) against that area share, the maps explain marked as lying outside the chest, and,
where explain measured it (``--faithfulness``), the mean deletion/insertion score. The
pointing game and the faithfulness score come with bootstrap 95% intervals over the pairs.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.data.labels import read_boxes
from cxrtool.explain.faithfulness import BORDER_FRACTION, border_band_share, in_border_band
from cxrtool.io.outputs import sidecar_path, write_csv, write_json
from cxrtool.io.records.explanations import FindingMap

OVERLAP_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
BoxXYWH = Sequence[float]


def iou(a: BoxXYWH, b: BoxXYWH) -> float:
    """Intersection over union of two [x, y, w, h] boxes."""
    inter = _intersection(a, b)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def iobb(predicted: BoxXYWH, truth: BoxXYWH) -> float:
    """Intersection over the predicted box's area (the ChestX-ray14 paper's IoBB)."""
    area = predicted[2] * predicted[3]
    return _intersection(predicted, truth) / area if area > 0 else 0.0


def _intersection(a: BoxXYWH, b: BoxXYWH) -> float:
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, width) * max(0.0, height)


def inside(point: Sequence[float], box: BoxXYWH, tolerance: float = 0.0) -> bool:
    """Whether an (x, y) point lies in an [x, y, w, h] box grown by ``tolerance`` pixels."""
    x, y = point
    return (box[0] - tolerance <= x <= box[0] + box[2] + tolerance
            and box[1] - tolerance <= y <= box[1] + box[3] + tolerance)


@dataclass
class LocalizationMetrics:
    """One finding's (or all findings') localization scores over (image, finding) pairs."""

    finding: str
    pairs: int = 0  # (image, finding) pairs with a true box
    mapped: int = 0  # of those, how many explain mapped
    iou_hits: dict[float, int] = field(default_factory=lambda: dict.fromkeys(OVERLAP_THRESHOLDS, 0))
    iobb_hits: dict[float, int] = field(default_factory=lambda: dict.fromkeys(OVERLAP_THRESHOLDS, 0))
    pointing_hits: int = 0
    hits: list[bool] = field(default_factory=list)  # pointing, per pair (misses included): for the intervals
    overlaps: list[tuple[float, float]] = field(default_factory=list)  # per pair: best IoU and IoBB (0: no map)
    in_band: list[bool] = field(default_factory=list)  # per mapped pair with a peak: in the border band
    outside_chest: int = 0  # mapped pairs whose map explain marked as lying outside the chest
    faithfulness: list[float] = field(default_factory=list)  # per mapped pair that has it: insertion - deletion AUC

    def add(self, truth: list[BoxXYWH], entry: FindingMap | None, tolerance: float,
            image_size: Sequence[int] | None = None) -> None:
        self.pairs += 1
        if entry is None:
            self.hits.append(False)
            self.overlaps.append((0.0, 0.0))
            return
        self.mapped += 1
        if entry.outside_chest:
            self.outside_chest += 1
        score = (entry.faithfulness or {}).get("score")
        if score is not None:
            self.faithfulness.append(float(score))
        predicted = [region.box for region in entry.regions]
        best_iou = max((iou(p, t) for p in predicted for t in truth), default=0.0)
        best_iobb = max((iobb(p, t) for p in predicted for t in truth), default=0.0)
        self.overlaps.append((float(best_iou), float(best_iobb)))
        for threshold in OVERLAP_THRESHOLDS:
            self.iou_hits[threshold] += best_iou > threshold
            self.iobb_hits[threshold] += best_iobb > threshold
        peak = entry.peak
        hit = peak is not None and any(inside(peak, t, tolerance) for t in truth)
        self.pointing_hits += hit
        self.hits.append(hit)
        if peak is not None and image_size:
            self.in_band.append(in_border_band(peak, (int(image_size[0]), int(image_size[1]))))

    def merge(self, other: LocalizationMetrics) -> None:
        self.pairs += other.pairs
        self.mapped += other.mapped
        self.pointing_hits += other.pointing_hits
        self.hits += other.hits
        self.overlaps += other.overlaps
        self.in_band += other.in_band
        self.outside_chest += other.outside_chest
        self.faithfulness += other.faithfulness
        for threshold in OVERLAP_THRESHOLDS:
            self.iou_hits[threshold] += other.iou_hits[threshold]
            self.iobb_hits[threshold] += other.iobb_hits[threshold]

    def rate(self, hits: int) -> float:
        return hits / self.pairs if self.pairs else float("nan")

    @property
    def pointing(self) -> float:
        return self.rate(self.pointing_hits)

    @property
    def border_band(self) -> float:
        """The share of the peaks that lie in the film's border band."""
        return float(np.mean(self.in_band)) if self.in_band else float("nan")

    @property
    def mean_faithfulness(self) -> float:
        return float(np.mean(self.faithfulness)) if self.faithfulness else float("nan")

    def to_dict(self, n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
        out = {
            "finding": self.finding,
            "pairs": self.pairs,
            "mapped": self.mapped,
            "pointing_game": _round(self.pointing),
            "pointing_game_ci95": _interval(self.hits, n_boot, seed),
            "iou_accuracy": {str(t): _round(self.rate(h)) for t, h in self.iou_hits.items()},
            "iobb_accuracy": {str(t): _round(self.rate(h)) for t, h in self.iobb_hits.items()},
            "peaks_in_border_band": _round(self.border_band),
            "outside_chest": self.outside_chest,
        }
        if self.faithfulness:
            out["faithfulness"] = _round(self.mean_faithfulness)
            out["faithfulness_ci95"] = _interval(self.faithfulness, n_boot, seed)
            out["faithfulness_maps"] = len(self.faithfulness)
        return out


def bootstrap_interval(values: Sequence[float], n_boot: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """A percentile bootstrap 95% interval of the mean (None for fewer than two values)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2 or n_boot < 1:
        return None
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    low, high = np.percentile(means, (2.5, 97.5))
    return float(low), float(high)


def _interval(values: Sequence[float], n_boot: int, seed: int) -> list[float] | None:
    found = bootstrap_interval(values, n_boot, seed)
    return None if found is None else [round(found[0], 4), round(found[1], 4)]


def _round(value: float) -> float | None:
    return None if value != value else round(value, 4)


@dataclass
class LocalizationReport:
    findings: dict[str, LocalizationMetrics]
    overall: LocalizationMetrics
    tolerance: float
    studies: int  # explained studies found
    unmatched_boxes: int  # true boxes whose image has no explained study
    all_maps: dict[str, LocalizationMetrics] = field(default_factory=dict)  # every map drawn, boxed or not: border band
    n_boot: int = 1000
    seed: int = 0
    paths: dict[str, Path] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        every = LocalizationMetrics("all maps")
        for metrics in self.all_maps.values():
            every.merge(metrics)
        return {
            "protocol": "ChestX-ray14 IoU/IoBB accuracy at T (correct when > T); pointing game on the map's peak; "
                        f"border band: the film's outer {BORDER_FRACTION:.0%} on every side; bootstrap 95% intervals "
                        "over the (image, finding) pairs",
            "pointing_tolerance_px": self.tolerance,
            "explained_studies": self.studies,
            "boxes_without_study": self.unmatched_boxes,
            "border_band_area_share": round(border_band_share(), 4),
            "overall": self.overall.to_dict(self.n_boot, self.seed),
            "findings": [m.to_dict(self.n_boot, self.seed) for m in self.findings.values()],
            "all_maps": {
                "maps": len(every.in_band),
                "peaks_in_border_band": _round(every.border_band),
                "outside_chest": every.outside_chest,
                "findings": {name: {"maps": len(m.in_band), "peaks_in_border_band": _round(m.border_band),
                                    "outside_chest": m.outside_chest} for name, m in self.all_maps.items()},
            },
        }


def read_explanations(
    predictions: str | os.PathLike | Sequence[str | os.PathLike], model: str | None = None,
    sizes: dict[str, list[int]] | None = None,
) -> dict[str, dict[str, FindingMap]]:
    """Study path -> explained findings of one model, from the sidecars of the studies the
    predictions tables list (a CSV, a folder searched for them, or several); ``sizes``, when
    given, is filled with each study's image size (rows, columns).

    Studies never explained by that model are left out. ``model`` (a checkpoint, a name
    or an id) chooses among several models, as in :func:`cxrtool.evaluate.evaluate`.
    """
    from cxrtool.io.records import read_prediction_tables, read_sidecar, sha256_file

    sources = [predictions] if isinstance(predictions, (str, os.PathLike)) else list(predictions)
    tables = read_prediction_tables(sources)
    wanted = sha256_file(model) if model is not None and Path(model).is_file() else model
    chosen = tables.choose(wanted)
    found: dict[str, dict[str, FindingMap]] = {}
    for row in tables.rows_of(chosen):
        path = Path(row["path"])
        sidecar = read_sidecar(sidecar_path(path.parent, path.name))
        if sidecar is None:
            continue
        results = [sidecar.result_for(chosen.model.id)] if chosen is not None and chosen.model.id else sidecar.results
        for result in results:
            if result is not None and result.explanations is not None:
                found[str(path)] = result.explanations.findings
                if sizes is not None and sidecar.image_size:
                    sizes[str(path)] = list(sidecar.image_size)
                break
    return found


def evaluate_localization(
    predictions_csv: str | os.PathLike | Sequence[str | os.PathLike],
    boxes_csv: str | os.PathLike,
    *,
    tolerance: float = 0.0,
    out_dir: str | os.PathLike | None = None,
    model: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> LocalizationReport:
    """Score explain's boxes and map peaks against true boxes (NIH or generic box CSV).

    A box's image joins the explained study whose path ends the same way (the file name,
    or its stem: boxes may name a PNG where the study is its DICOM; parent folders break
    ties).

    Raises:
        ValueError: when no explained study matches any box's image.
    """
    sizes: dict[str, list[int]] = {}
    explained = read_explanations(predictions_csv, model, sizes)
    where = predictions_csv if isinstance(predictions_csv, (str, os.PathLike)) else ", ".join(map(str, predictions_csv))
    if not explained:
        raise ValueError(f"no explained studies in {where}: run cxrtool explain on that folder first")
    by_name: dict[str, list[str]] = defaultdict(list)
    for path in explained:
        by_name[Path(path).name].append(path)
        by_name[Path(path).stem].append(path)
    truth: dict[tuple[str, str], list[BoxXYWH]] = defaultdict(list)
    unmatched = 0
    for box in read_boxes(boxes_csv):
        image = box.image.replace("\\", "/")
        candidates = list(dict.fromkeys(by_name.get(Path(image).name) or by_name.get(Path(image).stem) or []))
        if len(candidates) > 1:
            candidates = [c for c in candidates if c.replace("\\", "/").endswith(image)]
        if len(candidates) != 1:
            unmatched += 1
            continue
        truth[(candidates[0], box.finding)].append((box.x, box.y, box.w, box.h))
    if not truth:
        raise ValueError(f"none of the boxes in {boxes_csv} belongs to an explained study in {where}")
    findings: dict[str, LocalizationMetrics] = {}
    for (name, finding), boxes in sorted(truth.items(), key=lambda item: (item[0][1], item[0][0])):
        metrics = findings.setdefault(finding, LocalizationMetrics(finding))
        metrics.add(boxes, explained[name].get(finding), tolerance, sizes.get(name))
    overall = LocalizationMetrics("overall")
    for metrics in findings.values():
        overall.merge(metrics)
    all_maps: dict[str, LocalizationMetrics] = {}
    for name, entries in explained.items():
        for finding, entry in sorted(entries.items()):
            all_maps.setdefault(finding, LocalizationMetrics(finding)).add([], entry, tolerance, sizes.get(name))
    report = LocalizationReport(findings, overall, tolerance, len(explained), unmatched, dict(sorted(all_maps.items())),
                                n_boot=n_boot, seed=seed)
    first = Path(predictions_csv if isinstance(predictions_csv, (str, os.PathLike)) else predictions_csv[0])
    folder = Path(out_dir) if out_dir is not None else (first if first.is_dir() else first.parent)
    folder.mkdir(parents=True, exist_ok=True)
    report.paths["json"] = write_json(folder / "localization.json", report.to_dict())
    report.paths["csv"] = _write_csv(folder / "localization.csv", report)
    return report


def _write_csv(path: Path, report: LocalizationReport) -> Path:
    header = ["finding", "pairs", "mapped", "pointing_game"]
    header += [f"iou_{t}" for t in OVERLAP_THRESHOLDS] + [f"iobb_{t}" for t in OVERLAP_THRESHOLDS]
    # after the first release's columns, so scripts that read those by position keep working
    header += ["pointing_low", "pointing_high", "border_band", "outside_chest", "faithfulness"]
    rows = []
    for metrics in [*report.findings.values(), report.overall]:
        row = metrics.to_dict(report.n_boot, report.seed)
        low, high = row["pointing_game_ci95"] or (None, None)
        rows.append([metrics.finding, metrics.pairs, metrics.mapped, row["pointing_game"],
                     *row["iou_accuracy"].values(), *row["iobb_accuracy"].values(),
                     low, high, row["peaks_in_border_band"], row["outside_chest"], row.get("faithfulness")])
    return write_csv(path, header, rows)


def render_localization(report: LocalizationReport, thresholds: Iterable[float] = (0.1, 0.5)) -> Any:
    """A rich table (fits 80 columns): pairs, pointing game with its 95% interval, the share of
    peaks in the border band, IoU/IoBB accuracy at two thresholds, and the faithfulness score
    where explain measured it; every threshold is in localization.json and .csv."""
    from rich import box
    from rich.table import Table

    thresholds = list(thresholds)
    faithful = any(m.faithfulness for m in report.findings.values())
    table = Table(title=f"localization ({report.studies} explained studies; IoU/IoBB: accuracy at > T; band: peaks in "
                        f"the film's outer {BORDER_FRACTION:.0%}, {border_band_share():.0%} of its area)",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("finding", no_wrap=True, min_width=11)
    table.add_column("pairs", justify="right", no_wrap=True)
    table.add_column("pointing [95% CI]", justify="right", no_wrap=True)
    table.add_column("band", justify="right", no_wrap=True)
    for kind in ("IoU", "IoBB"):
        for t in thresholds:
            table.add_column(f"{kind} {t}", justify="right", no_wrap=True, min_width=len(kind) + 4)
    if faithful:
        table.add_column("faith.", justify="right", no_wrap=True)

    def number(value: float) -> str:
        return "n/a" if value != value else f"{value:.2f}"

    def cells(m: LocalizationMetrics) -> list[str]:
        interval = bootstrap_interval(m.hits, report.n_boot, report.seed)
        pointing = number(m.pointing) + (f" [{interval[0]:.2f}-{interval[1]:.2f}]" if interval else "")
        values = [m.rate(m.iou_hits[t]) for t in thresholds] + [m.rate(m.iobb_hits[t]) for t in thresholds]
        row = [m.finding, str(m.pairs), pointing, number(m.border_band), *map(number, values)]
        return row + [number(m.mean_faithfulness)] if faithful else row

    for metrics in report.findings.values():
        table.add_row(*cells(metrics))
    table.add_section()
    table.add_row(*cells(report.overall), style="bold")
    return table
