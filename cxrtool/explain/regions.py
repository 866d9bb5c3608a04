"""From a map on the model's input grid to what a clinician and a pipeline can use.

A CAM is computed on the square input; :func:`to_original` undoes the letterbox or the
centre crop (drop the padding, resize to the part of the radiograph the input showed). :func:`find_regions` thresholds it (a
fraction of its maximum, or Otsu) and labels the connected regions, strongest first, with
boxes ``[x, y, w, h]`` in original pixels (and millimetres when the spacing is known).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from cxrtool.io.records.explanations import Region as RegionRecord
from cxrtool.preprocess import Geometry

MAX_REGIONS = 255  # the mask PNG is uint8: pixel value k is region k


def to_original(cam: np.ndarray, geometry: Geometry) -> np.ndarray:
    """A map on the (S, S) input grid, resampled onto the original (H, W) pixels; zero on
    the parts of the original the input did not show (a centre crop's sides)."""
    top, left, shown_h, shown_w = geometry.shown
    new_h = max(1, round(shown_h * geometry.scale_y))
    new_w = max(1, round(shown_w * geometry.scale_x))
    inner = cam[geometry.pad_y : geometry.pad_y + new_h, geometry.pad_x : geometry.pad_x + new_w]
    shown = cv2.resize(inner, (shown_w, shown_h), interpolation=cv2.INTER_LINEAR)
    if (shown_h, shown_w) == (geometry.original_height, geometry.original_width):
        return shown
    full = np.zeros((geometry.original_height, geometry.original_width), dtype=shown.dtype)
    full[top : top + shown_h, left : left + shown_w] = shown
    return full


@dataclass
class Region:
    """One connected region of a thresholded map; activations are fractions of the map's peak."""

    label: int
    x: int
    y: int
    width: int
    height: int
    area_px: int
    peak: float
    mean: float

    def record(self, spacing: tuple[float, float] | None) -> RegionRecord:
        """The sidecar's record of it (in millimetres too when the spacing is known)."""
        record = RegionRecord(self.label, [self.x, self.y, self.width, self.height], self.area_px,
                              round(self.peak, 4), round(self.mean, 4))
        if spacing:
            row, col = spacing
            record.box_mm = [round(self.x * col, 2), round(self.y * row, 2), round(self.width * col, 2),
                             round(self.height * row, 2)]
            record.area_mm2 = round(self.area_px * row * col, 2)
        return record


@dataclass
class MapRegions:
    """A map's thresholding result: the level used, the regions, and the label image."""

    level: float  # the threshold, as a fraction of the map's peak
    regions: list[Region]
    labels: np.ndarray  # uint8 (H, W): 0 outside, k inside region k
    dropped: int = 0  # regions beyond MAX_REGIONS (the weakest), left out of the mask


def parse_threshold(value: str | float) -> float | str:
    """``--threshold``: a fraction in (0, 1) of the map's peak, or ``otsu``."""
    if isinstance(value, str) and value.strip().lower() == "otsu":
        return "otsu"
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a fraction in (0, 1) or 'otsu', got {value!r}") from None
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"threshold must be a fraction in (0, 1) or 'otsu', got {value!r}")
    return fraction


def find_regions(cam: np.ndarray, threshold: float | str = 0.5) -> MapRegions | None:
    """Threshold a map and label its connected regions (8-connected), strongest first;
    lines one pixel thin are not regions.

    Returns None for a map with no evidence (all zero, or not finite anywhere).
    """
    peak = float(np.max(cam)) if cam.size else 0.0
    if not np.isfinite(peak) or peak <= 0.0:
        return None
    scaled = np.clip(np.nan_to_num(cam / peak, nan=0.0), 0.0, 1.0).astype(np.float32)
    if threshold == "otsu":
        as_bytes = np.round(scaled * 255).astype(np.uint8)
        otsu, _ = cv2.threshold(as_bytes, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        level = float(otsu) / 255.0
        inside = as_bytes > otsu
        if not inside.any():  # a flat map: Otsu cannot split it
            inside = as_bytes >= otsu
    else:
        level = float(threshold)
        inside = scaled >= level
    count, components, stats, _ = cv2.connectedComponentsWithStats(inside.astype(np.uint8), connectivity=8)
    if count <= 1:
        return MapRegions(level, [], np.zeros(cam.shape, dtype=np.uint8))
    found = []
    for k in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[k])
        if w < 2 or h < 2:
            # a line one pixel thin: where a smooth upsampled map grazes the threshold
            # (a ridge or a saddle), not a region of evidence; it is left out of the mask
            continue
        # peak and mean inside the region, looked at only within its box
        values = scaled[y : y + h, x : x + w][components[y : y + h, x : x + w] == k]
        found.append((float(values.max()), float(values.mean()), k, x, y, w, h, area))
    found.sort(key=lambda region: -region[0])  # stable: ties keep the scan order
    regions = []
    relabel = np.zeros(count, dtype=np.uint8)
    for rank, (peak_value, mean_value, k, x, y, w, h, area) in enumerate(found[:MAX_REGIONS], start=1):
        regions.append(Region(rank, x, y, w, h, area, peak_value, mean_value))
        relabel[k] = rank
    return MapRegions(level, regions, relabel[components], dropped=max(0, len(found) - MAX_REGIONS))


def peak_point(cam: np.ndarray) -> tuple[int, int]:
    """(x, y) of the map's maximum, in the map's pixels."""
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return int(x), int(y)
