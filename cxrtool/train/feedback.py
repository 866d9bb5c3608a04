"""Paper 4's feedback loop (Han et al., WACV 2022): the model's own maps, measured with
PyRadiomics, become the positive sample of each image's embedding.

A *cycle*, every ``feedback_every`` epochs before an epoch starts:

1. **maps**: a frozen copy of the network being trained (never the network itself: no
   hooks, no change to its parameters, its mode or its gradients) scores every image of the
   training pool, unaugmented, and explain's map engine draws one map per image, of one
   finding (:func:`choose_findings`);
2. **regions**: the paper's rule turns the map into a box (:func:`region_box`);
3. **radiomics**: PyRadiomics measures the box on the model's input square, in worker
   processes (:func:`measure_regions`); a region it refuses (too small, flat) is dropped
   from the cycle with its reason, counted, never a crash.

The features are cached on disk under the network's digest and the cycle
(:class:`FeedbackCache`): a resumed run finds a finished cycle and never measures it
again, and a network with other weights never reads another's features. The loss term
(:class:`cxrtool.train.losses.RadiomicsContrast`) reads them by each image's row.

What is a choice here, and is documented as one:

- which finding's map makes the region: the image's present finding the model scores
  highest; for an image with no present finding (a normal film, or an unlabelled one) the
  finding it scores highest;
- the map: explain's map engine with ``feedback_cam`` (default the paper's Grad-CAM at the
  last stage, which costs one forward pass per image);
- the features: PyRadiomics' default extractor (the original image; all of its default
  feature classes, its default bin width 25 on the 8-bit input square) in 2D, so the
  shape class is ``shape2D``: 102 features, where the paper's 107 count the 3D shape
  class of a one-slice volume;
- the share of the pool each cycle re-measures (``feedback_fraction``): a rotating part,
  the rest keep the features of their last cycle, so a cycle costs no more than a third
  of an epoch at the demo's settings (README, "Paper 4: the radiomics feedback loop").
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cxrtool.radiomics.features import DEFAULT_FEATURE_CLASSES

# The region rule, after the paper's code: the map min-max normalised, a 5 x 5 Gaussian
# blur, a threshold at half the range, the outer contours and their bounding boxes, and
# the box whose mean normalised activation is highest, filled. (The public code takes the
# box with the largest mean of its four *coordinates*, a slip the paper's text does not
# share: the text is followed here.)
REGION_RULE = ("min-max normalise, 5x5 Gaussian blur, threshold at half the range, outer contours, "
               "the bounding box with the highest mean activation, filled")
FINDING_CHOICE = ("the image's present finding with the highest probability; for an image with none (or unlabelled), "
                  "the finding with the highest probability")
# PyRadiomics' default extractor, in 2D: its default image type, classes and bin width.
EXTRACTOR_SETTINGS: dict[str, Any] = {
    "imageType": {"Original": {}},
    "featureClass": {name: None for name in DEFAULT_FEATURE_CLASSES},
    "setting": {"binWidth": 25.0, "label": 1, "force2D": True, "force2Ddimension": 0},
}


def region_box(cam: np.ndarray) -> tuple[int, int, int, int] | None:
    """The paper's region of a map: ``(top, left, bottom, right)``, ends exclusive, or
    None for a flat map (no evidence anywhere: nothing to measure)."""
    cam = np.nan_to_num(np.asarray(cam, dtype=np.float32))
    low, high = float(cam.min()), float(cam.max())
    if not high > low:
        return None
    normalised = (cam - low) / (high - low)
    blurred = cv2.GaussianBlur(normalised, (5, 5), 0)
    binary = (blurred > 0.5).astype(np.uint8)
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    best, best_mean = None, -math.inf
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        mean = float(normalised[y:y + h, x:x + w].mean())
        if mean > best_mean:
            best, best_mean = (y, x, y + h, x + w), mean
    return best


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """A 0/1 mask of ``shape`` with the box filled."""
    mask = np.zeros(shape, dtype=np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 1
    return mask


def choose_findings(probabilities: np.ndarray, targets: np.ndarray) -> list[int]:
    """Per image, the finding whose map makes its region (:data:`FINDING_CHOICE`)."""
    present = np.nan_to_num(np.asarray(targets, dtype=np.float64), nan=0.0) > 0.5
    masked = np.where(present, probabilities, -np.inf)
    return [int(np.argmax(masked[i]) if present[i].any() else np.argmax(probabilities[i])) for i in range(len(probabilities))]


@functools.lru_cache(maxsize=1)
def feature_names() -> tuple[str, ...]:
    """The names of the extractor's features, in the order of the cached vectors (PyRadiomics
    names its features by computing them: a constructed 16 x 16 region, once)."""
    from cxrtool.radiomics.features import extract

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16)).astype(np.float32)
    result = extract(image, box_mask((16, 16), (2, 2, 14, 14)), params=EXTRACTOR_SETTINGS)
    return tuple(sorted(key for key in result if not key.startswith("diagnostics_")))


def _measure_chunk(jobs: list[tuple[np.ndarray, tuple[int, int, int, int]]]) -> list[tuple[np.ndarray | None, str]]:
    """Worker: each (8-bit square, box) measured, or None and the reason it was refused."""
    from cxrtool.radiomics.features import RegionError, extract

    names = feature_names()
    out: list[tuple[np.ndarray | None, str]] = []
    for square, box in jobs:
        try:
            result = extract(square.astype(np.float32), box_mask(square.shape, box), params=EXTRACTOR_SETTINGS)
            out.append((np.array([float(result[name]) for name in names], dtype=np.float32), ""))
        except RegionError as error:
            out.append((None, str(error)))
        except Exception as error:  # noqa: BLE001 - one region's surprise drops that region, not the run
            out.append((None, f"{type(error).__name__}: {' '.join(str(error).split())}"[:200]))
    return out


def measure_regions(squares: Sequence[np.ndarray], boxes: Sequence[tuple[int, int, int, int]], *, workers: int = 2,
                    progress: Callable[[int, int], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """PyRadiomics features (N, F) of each box on its 8-bit square, NaN rows where refused,
    and each region's reason ("" when measured). In ``workers`` processes (0: in this one), in chunks."""
    from cxrtool._workers import process_pool

    jobs = list(zip(squares, boxes, strict=True))
    count = len(feature_names())
    features = np.full((len(jobs), count), np.nan, dtype=np.float32)
    reasons = [""] * len(jobs)
    chunk = max(1, min(32, math.ceil(len(jobs) / (4 * max(1, workers)))))  # small enough to spread over the workers
    chunks = [jobs[start:start + chunk] for start in range(0, len(jobs), chunk)]
    done = 0

    def take(start: int, results: list[tuple[np.ndarray | None, str]]) -> None:
        nonlocal done
        for k, (vector, reason) in enumerate(results):
            if vector is not None:
                features[start + k] = vector
            else:
                reasons[start + k] = reason or "not measured"
        done += len(results)
        if progress is not None:
            progress(done, len(jobs))

    with process_pool(workers if len(chunks) > 1 else 0) as pool:
        for n, results in enumerate(pool.map(_measure_chunk, chunks)):
            take(n * chunk, results)
    return features, reasons


def weights_digest(network: torch.nn.Module) -> str:
    """SHA-256 of a network's parameters and buffers (names and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(network.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def standardised(features: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Features with NaN as 0 (as the paper's code), then z-scored with the statistics of the
    valid rows (the training pool's); a constant feature becomes 0."""
    values = np.nan_to_num(np.asarray(features, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    rows = values[np.asarray(valid, dtype=bool)]
    if len(rows) == 0:
        return np.zeros_like(values, dtype=np.float32)
    mean, std = rows.mean(0), rows.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    out = (values - mean) / std
    out[:, rows.std(0) <= 1e-12] = 0.0
    return out.astype(np.float32)


@dataclass
class Cycle:
    """One cycle's result over the training pool (rows of the training table)."""

    number: int
    key: str  # the cache key: the network's digest with the cycle's settings
    positions: np.ndarray  # (N,) table rows of the pool
    features: np.ndarray  # (N, F) raw features, NaN rows: no region (yet, or refused)
    findings: np.ndarray  # (N,) the finding whose map made each region, -1: none yet
    boxes: np.ndarray  # (N, 4) top, left, bottom, right on the input square; -1: none
    refreshed: int = 0  # rows measured in this cycle
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count, this cycle
    seconds_maps: float = 0.0
    seconds_radiomics: float = 0.0
    side: int = 0  # the input square's side the boxes are on (0: not known, a cache from before it was kept)
    reused: bool = False  # read from the cache, not computed

    @property
    def valid(self) -> np.ndarray:
        return ~np.isnan(self.features).any(axis=1)

    @property
    def in_border_band(self) -> float | None:
        """The share of the regions whose centre lies in the film's border band (its outer
        tenth, :func:`cxrtool.explain.faithfulness.in_border_band`; 36% of the area): regions
        placed by chance sit there about that often, regions on findings rarely."""
        return regions_in_border_band(self.boxes[self.valid], self.side)

    def record(self) -> dict[str, Any]:
        band = self.in_border_band
        return {"cycle": self.number, "pool": len(self.positions), "regions": int(self.valid.sum()), "refreshed": self.refreshed,
                "dropped": int(sum(self.dropped.values())), "dropped_reasons": dict(self.dropped),
                "regions_in_border_band": None if band is None else round(band, 3),
                "seconds_maps": round(self.seconds_maps, 1), "seconds_radiomics": round(self.seconds_radiomics, 1)}


def regions_in_border_band(boxes: np.ndarray, side: int) -> float | None:
    """The share of ``boxes`` (top, left, bottom, right on a ``side`` square) whose centre
    lies in the film's border band; None without boxes or a side."""
    from cxrtool.explain.faithfulness import in_border_band

    boxes = np.asarray(boxes).reshape(-1, 4)
    if side <= 0 or len(boxes) == 0:
        return None
    centres = [((left + right) / 2, (top + bottom) / 2) for top, left, bottom, right in boxes.tolist()]
    return float(np.mean([in_border_band(centre, (side, side)) for centre in centres]))


class FeedbackCache:
    """Finished cycles on disk (``FOLDER/cycle003-<key>.npz``), written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def path(self, number: int, key: str) -> Path:
        return self.folder / f"cycle{number:03d}-{key[:20]}.npz"

    def load(self, number: int, key: str) -> Cycle | None:
        path = self.path(number, key)
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            if meta.get("key") != key:
                return None
            return Cycle(number, key, data["positions"], data["features"], data["findings"], data["boxes"],
                         refreshed=int(meta["refreshed"]), dropped=dict(meta["dropped"]),
                         seconds_maps=float(meta["seconds_maps"]), seconds_radiomics=float(meta["seconds_radiomics"]),
                         side=int(meta.get("side", 0)), reused=True)

    def save(self, cycle: Cycle) -> Path:
        from cxrtool.io.outputs import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        meta = {"key": cycle.key, "refreshed": cycle.refreshed, "dropped": cycle.dropped,
                "seconds_maps": cycle.seconds_maps, "seconds_radiomics": cycle.seconds_radiomics, "side": cycle.side,
                "feature_names": list(feature_names())}
        buffer = io.BytesIO()
        np.savez(buffer, positions=cycle.positions, features=cycle.features, findings=cycle.findings, boxes=cycle.boxes,
                 meta=np.array(json.dumps(meta)))
        path = self.path(cycle.number, cycle.key)
        with atomic_write(path, "wb") as handle:
            handle.write(buffer.getvalue())
        return path


def refresh_part(count: int, number: int, fraction: float, seed: int) -> np.ndarray:
    """Which of ``count`` pool rows cycle ``number`` (from 1) measures: all of them at
    fraction 1; else the pool is cut once (by the seed) into ``ceil(1 / fraction)`` parts and
    the cycles take them in turn."""
    parts = max(1, math.ceil(1 / fraction - 1e-9))
    if parts == 1:
        return np.arange(count)
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(np.array_split(order, parts)[(number - 1) % parts])


@dataclass
class FeedbackRun:
    """What a cycle needs besides the network: the pool, how to read its images, the
    settings, where its cache lives and where its progress goes."""

    positions: np.ndarray  # table rows of the training pool (labelled and unlabelled)
    targets: np.ndarray  # (N, K) the pool's labels, NaN unknown (all NaN: unlabelled)
    square: Callable[[int], np.ndarray | None]  # table row -> the 8-bit input square, None if unreadable
    to_input: Callable[[np.ndarray], torch.Tensor]  # 8-bit square -> the unaugmented model input (1, S, S)
    cache: FeedbackCache
    method: str
    layer: str | None
    fraction: float
    seed: int
    device: torch.device
    batch_size: int = 64
    workers: int = 2
    progress: Callable[[str, int, int], None] | None = None  # (phase, done, total)

    def key(self, network: torch.nn.Module, number: int, previous: Cycle | None) -> str:
        settings = {"number": number, "method": self.method, "layer": self.layer, "fraction": self.fraction, "seed": self.seed,
                    "extractor": EXTRACTOR_SETTINGS, "positions": hashlib.sha256(self.positions.tobytes()).hexdigest(),
                    "previous": previous.key if previous else None}
        text = weights_digest(network) + json.dumps(settings, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def cycle(self, network: torch.nn.Module, number: int, previous: Cycle | None) -> Cycle:
        """Cycle ``number`` on the network as it is now: read back from the cache when it was
        finished before, else computed (on a frozen copy) and cached."""
        key = self.key(network, number, previous)
        found = self.cache.load(number, key)
        if found is not None:
            return found
        rows = refresh_part(len(self.positions), number, self.fraction, self.seed)
        started = time.monotonic()
        frozen = copy.deepcopy(network).eval()
        try:
            chosen, boxes = self._regions(frozen, rows, number)
        finally:
            del frozen
        maps_seconds = time.monotonic() - started
        if previous is not None:
            features, findings, all_boxes = previous.features.copy(), previous.findings.copy(), previous.boxes.copy()
        else:
            count = len(feature_names())
            features = np.full((len(self.positions), count), np.nan, dtype=np.float32)
            findings = np.full(len(self.positions), -1, dtype=np.int64)
            all_boxes = np.full((len(self.positions), 4), -1, dtype=np.int64)
        dropped: dict[str, int] = {}
        started = time.monotonic()
        measurable = [k for k, box in enumerate(boxes) if box is not None]
        for k, box in enumerate(boxes):
            if box is None:  # no region this cycle: the row's last one is no longer its own
                reason = "unreadable image" if chosen[k] < 0 else "flat map: no evidence to outline"
                dropped[reason] = dropped.get(reason, 0) + 1
                features[rows[k]], findings[rows[k]], all_boxes[rows[k]] = np.nan, -1, -1
        squares = [self.square(int(self.positions[rows[k]])) for k in measurable]
        values, reasons = measure_regions(squares, [boxes[k] for k in measurable], workers=self.workers,
                                          progress=self._reporter(f"feedback cycle {number}: radiomics"))
        for k, vector, reason in zip(measurable, values, reasons, strict=True):
            row = rows[k]
            features[row] = vector
            findings[row] = chosen[k]
            all_boxes[row] = boxes[k]
            if reason:
                dropped[_reason_kind(reason)] = dropped.get(_reason_kind(reason), 0) + 1
        side = squares[0].shape[0] if squares else (previous.side if previous is not None else 0)
        result = Cycle(number, key, self.positions, features, findings, all_boxes, refreshed=len(rows), dropped=dropped,
                       seconds_maps=maps_seconds, seconds_radiomics=time.monotonic() - started, side=side)
        self.cache.save(result)
        return result

    def _regions(self, frozen: torch.nn.Module, rows: np.ndarray, number: int) -> tuple[list[int], list[tuple[int, int, int, int] | None]]:
        """Each pool row's chosen finding and region, from the frozen network's maps."""
        from cxrtool.explain.cams import make_engine

        chosen: list[int] = []
        boxes: list[tuple[int, int, int, int] | None] = []
        report = self._reporter(f"feedback cycle {number}: maps ({self.method})")
        with make_engine(frozen, self.method, self.layer) as engine:
            for start in range(0, len(rows), self.batch_size):
                part = rows[start:start + self.batch_size]
                squares = [self.square(int(self.positions[r])) for r in part]  # read once, for the inputs
                readable = [square is not None for square in squares]
                if not any(readable):
                    chosen += [-1] * len(part)
                    boxes += [None] * len(part)
                    continue
                inputs = {j: self.to_input(square) for j, square in enumerate(squares) if square is not None}
                blank = torch.zeros_like(next(iter(inputs.values())))  # an unreadable image: no map is asked of it
                batch = torch.stack([inputs.get(j, blank) for j in range(len(part))]).to(self.device)
                batch = batch.contiguous(memory_format=torch.channels_last)
                targets = self.targets[part]
                picks: list[int] = []

                def wanted(probabilities: np.ndarray, targets=targets, readable=readable, picks=picks) -> list[list[int]]:
                    picks.extend(choose_findings(probabilities, targets))
                    return [[pick] if ok else [] for pick, ok in zip(picks, readable, strict=True)]

                result = engine(batch, wanted)
                for j, (pick, ok) in enumerate(zip(picks, readable, strict=True)):
                    chosen.append(pick if ok else -1)
                    boxes.append(region_box(result.maps[(j, pick)]) if ok else None)
                if report is not None:
                    report(min(start + len(part), len(rows)), len(rows))
        return chosen, boxes

    def _reporter(self, phase: str) -> Callable[[int, int], None] | None:
        if self.progress is None:
            return None
        progress = self.progress
        return lambda done, total: progress(phase, done, total)


def _reason_kind(reason: str) -> str:
    """A refusal's reason with its numbers as ``n``, so that alike refusals count together
    ("region n is nxn pixels, a line: ...")."""
    return re.sub(r"\d+(?:\.\d+)?", "n", " ".join(reason.split()))[:120] or "refused"
