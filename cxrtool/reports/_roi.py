"""Regions in a Structured Report: a region's outline as an SR polygon, and the TID 1410
Planar ROI Measurement Group that carries it, for the SRs of explain's regions
(:mod:`cxrtool.reports.sr`) and of radiomics' (:mod:`cxrtool.reports.radiomics_sr`).

A region is given either as its outline on the source image (a closed POLYLINE, first
point = last, the form TID 1410 takes for an area on an image: 2D SCOORD has no POLYGON; in
pixel coordinates, PS3.3 C.18.6.1.1: column then row, the top left corner of the top left pixel
at 0.0\\0.0, so a pixel's centre is at +0.5) or, for a region that is a DICOM SEG's segment,
as a reference to that segment (TID 1410's Referenced Segmentation Frame); never both (the
template takes one).

Nothing here imports highdicom at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.reports._dicom import NoDicom


def outline(region: np.ndarray) -> np.ndarray | None:
    """The outer boundary of a region (a boolean image; its largest connected part) as a
    closed polyline in SR pixel coordinates, shape (N, 2), first point = last; simplified to
    within half a pixel. None for an empty region. A region of one or two pixels (no area
    to trace) gets the outline of its pixels' box.

    Holes in a region are not drawn: the polygon is its outer edge (the SEG, where one is
    written, holds the exact pixels).
    """
    import cv2

    image = np.ascontiguousarray(region, dtype=np.uint8)
    if not image.any():
        return None
    contours, _ = cv2.findContours(image, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    largest = max(contours, key=lambda contour: (cv2.contourArea(contour), len(contour)))
    points = cv2.approxPolyDP(largest, 0.5, True)[:, 0, :].astype(np.float64)
    if len(points) < 3 or cv2.contourArea(points.astype(np.float32)) <= 0:
        rows, columns = np.nonzero(image)
        return box_polygon([int(columns.min()), int(rows.min()), int(columns.max() - columns.min() + 1),
                            int(rows.max() - rows.min() + 1)])
    # A contour runs through pixel centres; the SR's pixel coordinates put them at +0.5.
    points += 0.5
    return np.vstack([points, points[:1]])


def box_polygon(box: Sequence[int]) -> np.ndarray:
    """A box ``[x, y, w, h]`` in pixels as a closed polygon around its pixels."""
    x, y, w, h = (float(value) for value in box)
    return np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]], dtype=np.float64)


def read_label_image(path: Path, shape: tuple[int, int], what: str = "") -> np.ndarray:
    """A label image explain wrote (``*.mask.png``: region k = pixel value k), which must lie
    on the image's grid ``shape`` (rows, columns); ``what`` names it in the reasons (default:
    its file's name).

    Raises:
        NoDicom: missing (or a link), unreadable, or not on the grid.
    """
    import cv2

    what = what or f"the mask {path.name}"
    if path.is_symlink() or not path.is_file():
        raise NoDicom(f"{what} is not there: explain the study again (--overwrite)")
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise NoDicom(f"{what} is not a readable label image: explain the study again (--overwrite)")
    if mask.shape != shape:
        raise NoDicom(f"{what} is {mask.shape[1]}x{mask.shape[0]} pixels, the image {shape[1]}x{shape[0]}: "
                      "not on its pixel grid")
    return mask


def label_outlines(path: Path, labels: Sequence[int], shape: tuple[int, int]) -> dict[int, np.ndarray]:
    """The outlines of the regions ``labels`` of a label image (region k = pixel value k),
    which must lie on the image's grid ``shape`` (rows, columns).

    Raises:
        NoDicom: the label image is missing, unreadable or not on the grid.
    """
    mask = read_label_image(path, shape)
    found = {}
    for label in labels:
        polygon = outline(mask == label)
        if polygon is not None:
            found[label] = polygon
    return found


def pixel_area_unit() -> Any:
    """The unit of an area in pixels (a UCUM annotation: dimensionless, named)."""
    import highdicom as hd

    return hd.sr.CodedConcept("{pixels}", "UCUM", "pixels")


def planar_group(
    source: Any,
    *,
    identifier: str,
    uid: str,
    finding: Any,
    algorithm: Any,
    measurements: Sequence[Any],
    polygon: np.ndarray | None = None,
    segment: tuple[Any, int, Sequence[int]] | None = None,
    qualitative: Sequence[Any] = (),
) -> Any:
    """A TID 1410 Planar ROI Measurement Group on the image ``source`` (its header): the
    region as ``polygon`` (:func:`outline`) or as ``segment`` (a SEG's header, the segment's
    number, its frames on the image), with its tracking identifier, finding type, algorithm
    and measurements."""
    import highdicom as hd

    if (polygon is None) == (segment is None):
        raise ValueError("a planar ROI is a polygon or a segment, one of them")
    if segment is not None:
        seg, number, frames = segment
        where = {"referenced_segment": hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
            frame_number=frames[0] if len(frames) == 1 else list(frames), segment_number=number,
            source_image=hd.sr.SourceImageForSegmentation.from_source_image(source))}
    else:
        where = {"referenced_region": hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE, graphic_data=polygon,
            source_image=hd.sr.SourceImageForRegion.from_source_image(source))}
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier[:64]),
        finding_type=finding, algorithm_id=algorithm, measurements=list(measurements) or None,
        qualitative_evaluations=list(qualitative) or None, **where)
    if segment is not None:
        _frame_names_the_segment(group)
    return group


def _frame_names_the_segment(items: Any) -> None:
    """highdicom 0.28 gives a Referenced Segmentation Frame both the frame and the segment's
    number; PS3.3 (C.17.3.2.1, the IMAGE content item's Referenced SOP Sequence) forbids a
    Referenced Segment Number beside a Referenced Frame Number, and dciodvfy says so. The
    frame alone names the segment (each frame of a SEG holds one): the number goes."""
    for item in items:
        for reference in item.get("ReferencedSOPSequence", []):
            if "ReferencedFrameNumber" in reference and "ReferencedSegmentNumber" in reference:
                del reference.ReferencedSegmentNumber
        _frame_names_the_segment(item.get("ContentSequence", []))


__all__ = ["box_polygon", "label_outlines", "outline", "pixel_area_unit", "planar_group", "read_label_image"]
