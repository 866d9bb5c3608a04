"""Where the chest is on a radiograph, from the image alone, and whether a map lies on it.

A map whose peak, or most of whose weight, lies outside the chest (on the film's edge, a
shoulder, a collimator border, a label) says nothing a clinician can use, however high the
finding's probability. :func:`chest_mask` finds the chest without a model: the dark part of
the film (Otsu on a smoothed copy) is air; cut at its thin links, the pieces that touch the
film's edge are the air around the patient, the large ones that do not are lung fields, and
the body is the rest (its largest piece, holes filled). The chest is the lung fields' convex
hull, widened by a margin that takes in the heart's borders and the pleura, and extended
downwards by 30% of the lungs' height: the posterior costophrenic recesses project below the
domes, and an effusion hides the aerated bases the hull is made of. Where a lung field is not
found on each side, the body's convex hull stands in for the chest (on a film whose lungs
are as dark as the air around the patient, the body alone would leave them out); where no
body is found, or its hull is too small to hold the lungs or does not reach across the
middle of the film at mid-height (both hemithoraces), nothing is judged: a wrong mask must
not call a good map untrustworthy.

:func:`judge_map` turns that into the record the sidecar and the overlay carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from cxrtool.io.records.explanations import Region

# The share of a map's positive weight that must lie on the chest for the map to be trusted.
MIN_CHEST_SHARE = 0.5
# The margin around the lung fields' hull, as a fraction of the image's longer side.
CHEST_MARGIN = 0.06
# How far below the lung fields the chest reaches, as a fraction of their height.
BASE_EXTENSION = 0.3
# A lung field is at least this share of the image's area.
MIN_LUNG_SHARE = 0.01
# Dark links thinner than about twice this fraction of the longer side are cut.
LINK_CUT = 0.025
# A body hull smaller than this share of the film is not trusted to hold the lungs.
MIN_BODY_SHARE = 0.4
WORK_SIDE = 256  # the mask is found on a copy of about this size, then scaled back


@dataclass(frozen=True)
class ChestMask:
    """A boolean (H, W) mask of the chest and how it was found: "lungs" (the hull of the
    lung fields), "body" (no lung field found on each side of the film: the body), or
    "none" (no body either)."""

    mask: np.ndarray
    source: str

    def resized(self, shape: tuple[int, int]) -> ChestMask:
        """The same mask on another grid of the same image (nearest neighbour)."""
        if self.mask.shape == tuple(shape):
            return self
        mask = cv2.resize(self.mask.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        return ChestMask(mask.astype(bool), self.source)


NO_CHEST = ChestMask(np.zeros((1, 1), dtype=bool), "none")  # nothing to judge by


def chest_mask(pixels: np.ndarray) -> ChestMask:
    """The chest on a grey radiograph (H, W), bright bone and tissue, dark air (as displayed)."""
    height, width = pixels.shape
    scale = WORK_SIDE / max(height, width)
    small = cv2.resize(pixels.astype(np.float32), (max(8, round(width * scale)), max(8, round(height * scale))),
                       interpolation=cv2.INTER_AREA) if scale < 1 else pixels.astype(np.float32)
    low, high = np.percentile(small, (0.5, 99.5))
    if not np.isfinite(high - low) or high - low <= 1e-6:
        return ChestMask(np.zeros((height, width), dtype=bool), "none")
    grey = np.clip((small - low) / (high - low), 0, 1)
    grey = cv2.GaussianBlur(grey, (0, 0), max(1.0, 0.01 * max(grey.shape)))
    as_bytes = np.round(grey * 255).astype(np.uint8)
    level, _ = cv2.threshold(as_bytes, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # The dark part of the film is air: outside the body, and the lung fields inside it. Thin
    # dark links between them (the trachea, the soft tissue of an axilla) are cut by an
    # erosion; the pieces that touch the film's edge are the background, the large ones that
    # do not are lung fields; each grows back inside the dark part.
    dark = (as_bytes <= level).astype(np.uint8)
    rows, cols = dark.shape
    cut = max(1, round(LINK_CUT * max(rows, cols)))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * cut + 1, 2 * cut + 1))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(cv2.erode(dark, disc), connectivity=8)
    outside = np.zeros(dark.shape, dtype=np.uint8)
    lung_cores = np.zeros(dark.shape, dtype=np.uint8)
    sides = set()
    for k in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[k])
        if x == 0 or y == 0 or x + w >= cols or y + h >= rows:
            outside[labels == k] = 1
        elif area >= MIN_LUNG_SHARE * dark.size:
            lung_cores[labels == k] = 1
            sides.add(centroids[k][0] < cols / 2)
    background = (cv2.dilate(outside, disc) & dark).astype(bool)
    body = _fill_holes(_largest(~background))
    if body.sum() < 0.05 * body.size:
        return ChestMask(np.zeros((height, width), dtype=bool), "none")
    if len(sides) == 2:  # a lung field on each side of the film: the chest is their hull
        lungs = cv2.dilate(lung_cores, disc) & dark
        hull = np.zeros(dark.shape, dtype=np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(lungs)), 1)
        margin = max(1, round(CHEST_MARGIN * max(rows, cols)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin + 1, 2 * margin + 1))
        hull = cv2.dilate(hull, kernel)
        # and downwards (a one-sided vertical dilation): the recesses and hidden bases
        _, _, _, lung_height = cv2.boundingRect(cv2.findNonZero(lungs))
        drop = max(1, round(BASE_EXTENSION * lung_height))
        chest, source = cv2.dilate(hull, np.ones((drop + 1, 1), np.uint8), anchor=(0, drop)).astype(bool), "lungs"
    else:  # the body's hull: the lungs of a film whose air links them to the background are in it
        hull = np.zeros(dark.shape, dtype=np.uint8)
        cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(body.astype(np.uint8))), 1)
        chest, source = hull.astype(bool), "body"
        middle = round(0.45 * rows)
        reaches = chest[middle, round(0.2 * cols)] and chest[middle, round(0.8 * cols)]
        if chest.sum() < MIN_BODY_SHARE * chest.size or not reaches:
            # only the mediastinum and the abdomen stood out: not a body outline to judge by
            return ChestMask(np.zeros((height, width), dtype=bool), "none")
    full = cv2.resize(chest.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    return ChestMask(full, source)


def _largest(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    # flood the background from outside a one-pixel frame; what it cannot reach is a hole
    framed = np.pad(mask.astype(np.uint8), 1)
    flood = framed.copy()
    seeds = np.zeros((framed.shape[0] + 2, framed.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, seeds, (0, 0), 1)
    holes = flood[1:-1, 1:-1] == 0
    return mask | holes


def judge_map(cam: np.ndarray, chest: ChestMask, peak: tuple[int, int] | None) -> dict:
    """Whether a map (on the same grid as the mask) can be read as pointing at the chest.

    Returns the sidecar's ``trust`` record: ``chest_share`` (the share of the map's positive
    weight on the chest), ``peak_on_chest``, ``outside_chest`` (true when the peak is off the
    chest or less than :data:`MIN_CHEST_SHARE` of the weight is on it), a ``reason`` when
    so, and ``chest`` (how the chest was found).
    """
    record: dict = {"chest": chest.source}
    if chest.source == "none":
        record["note"] = "no chest found on the image: the map is not judged"
        return record
    weight = np.clip(np.nan_to_num(cam, nan=0.0), 0, None)
    total = float(weight.sum())
    share = float(weight[chest.mask].sum()) / total if total > 0 else 0.0
    record["chest_share"] = round(share, 4)
    reasons = []
    if peak is not None:
        x, y = peak
        on_chest = bool(chest.mask[min(max(y, 0), chest.mask.shape[0] - 1), min(max(x, 0), chest.mask.shape[1] - 1)])
        record["peak_on_chest"] = on_chest
        if not on_chest:
            reasons.append("the map's peak lies outside the chest")
    if total > 0 and share < MIN_CHEST_SHARE:
        reasons.append(f"only {share:.0%} of the map's weight lies on the chest")
    record["outside_chest"] = bool(reasons)
    if reasons:
        record["reason"] = "; ".join(reasons)
    return record


def region_chest_shares(labels: np.ndarray, chest: ChestMask) -> list[float]:
    """For each region of a label image (pixel value k for region k, 0 outside), the share
    of its pixels on the chest, in region order."""
    count = int(labels.max()) if labels.size else 0
    if count == 0:
        return []
    flat = labels.ravel().astype(np.int64)
    total = np.bincount(flat, minlength=count + 1)
    on = np.bincount(flat[chest.mask.ravel()], minlength=count + 1)
    return [round(float(on[k]) / float(total[k]), 4) if total[k] else 0.0 for k in range(1, count + 1)]


def region_doubt(region: Region, trust: Mapping[str, Any] | None) -> str | None:
    """Why a region of a map should not be measured as evidence, or None: the region lies
    mostly off the chest, or its map's peak or weight does (``trust`` of :func:`judge_map`)."""
    if region.chest_share is not None and region.chest_share < MIN_CHEST_SHARE:
        return "region off the chest"
    if trust and trust.get("outside_chest"):
        return "its map outside the chest"
    return None
