"""DICOM Segmentation (SEG) objects as masks of single radiographs.

A SEG holds one or more segments (numbered from 1, each with a label such as "Nodule"),
stored as frames that each belong to one segment and, for projection radiographs, derive
from one source image (named by its SOP Instance UID). :func:`read_seg` reads the header
and frames with pydicom; :meth:`DicomSeg.mask` gives the 2D mask of one segment on one
source image.

highdicom is the field's library for writing SEG, and cxrtool's tests use it to write them;
its reader, though, refuses the SEGs it writes for projection radiographs (it requires a
Slice Thickness, which a radiograph has none of), so the reading here is pydicom's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

SEG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation Storage
}


class SegError(ValueError):
    """A SEG that cannot be used as a mask; the message is the one-line reason."""


@dataclass
class DicomSeg:
    """A SEG's segments and frames (each frame: its segment, its source image, its pixels)."""

    path: Path
    segments: dict[int, str]  # segment number -> label
    kind: str  # BINARY, FRACTIONAL or LABELMAP
    frame_segments: list[int | None] = field(default_factory=list)  # None: a LABELMAP frame
    frame_sources: list[str | None] = field(default_factory=list)
    frames: np.ndarray | None = None  # (n, rows, cols)
    max_fraction: float = 1.0

    @property
    def sources(self) -> list[str]:
        """The SOP Instance UIDs of the images the frames derive from, in order."""
        return list(dict.fromkeys(uid for uid in self.frame_sources if uid))

    def mask(self, segment: int, source_uid: str | None = None) -> np.ndarray:
        """The (rows, cols) uint16 mask holding ``segment`` where that segment is present
        on the image ``source_uid`` (0 elsewhere).

        Frames that name no source image count for any image, so a SEG written without
        derivation references still works for the one image it was drawn on.

        Raises:
            SegError: the segment does not exist, or the SEG does not reference the image.
        """
        if segment not in self.segments:
            raise SegError(f"SEG {self.path.name} has no segment {segment}; its segments are {self._segment_list()}")
        if self.frames is None:
            raise SegError(f"SEG {self.path.name} was read without its pixel data")
        picked = [
            index for index, source in enumerate(self.frame_sources)
            if source_uid is None or source is None or source == source_uid
        ]
        if not picked:
            raise SegError(f"SEG {self.path.name} does not reference this image (SOP Instance UID {source_uid})")
        out = np.zeros(self.frames.shape[1:], dtype=np.uint16)
        for index in picked:
            frame = self.frames[index]
            if self.kind == "LABELMAP":
                present = frame == segment
            elif self.frame_segments[index] != segment:
                continue
            elif self.kind == "FRACTIONAL":
                present = frame >= 0.5 * self.max_fraction
            else:
                present = frame > 0
            out[present] = segment
        return out

    def _segment_list(self) -> str:
        return ", ".join(f"{number} {label}".strip() for number, label in sorted(self.segments.items()))


def is_seg(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a DICOM Segmentation (reads the header only)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
        return False
    return str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES or str(ds.get("Modality", "")) == "SEG"


def sop_instance_uid(path: str | os.PathLike) -> str | None:
    """A DICOM file's SOP Instance UID (header only); None for other files."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError):
        return None
    value = ds.get("SOPInstanceUID")
    return str(value) if value else None


def read_seg(path: str | os.PathLike, *, pixels: bool = True) -> DicomSeg:
    """Read a SEG's segments, frame references and (unless ``pixels`` is False) frames.

    Raises:
        SegError: not a readable DICOM Segmentation, or frames that cannot be decoded.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (InvalidDicomError, OSError, ValueError, TypeError, AttributeError) as error:
        raise SegError(f"{path.name}: not a readable DICOM file ({' '.join(str(error).split())[:120]})") from None
    if str(ds.get("SOPClassUID", "")) not in SEG_SOP_CLASSES and str(ds.get("Modality", "")) != "SEG":
        raise SegError(f"{path.name}: a DICOM file but not a Segmentation (Modality {ds.get('Modality', '?')})")
    segments = {
        int(item.SegmentNumber): str(item.get("SegmentLabel", "") or "").strip()
        for item in ds.get("SegmentSequence", [])
        if "SegmentNumber" in item
    }
    if not segments:
        raise SegError(f"{path.name}: a Segmentation without segments (no Segment Sequence)")
    kind = str(ds.get("SegmentationType", "BINARY")).upper()
    n_frames = int(ds.get("NumberOfFrames") or 1)
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    seg = DicomSeg(path, segments, kind, max_fraction=float(ds.get("MaximumFractionalValue") or 1.0))
    for index in range(n_frames):
        groups = [per_frame[index] if index < len(per_frame) else None, shared]
        seg.frame_segments.append(None if kind == "LABELMAP" else _frame_segment(groups, segments))
        seg.frame_sources.append(_frame_source(groups))
    if pixels:
        try:
            frames = np.asarray(ds.pixel_array)
        except Exception as error:  # noqa: BLE001 - any decoder failure is this file's reason
            raise SegError(f"{path.name}: pixel data cannot be decoded ({' '.join(str(error).split())[:120]})") from None
        seg.frames = frames.reshape(n_frames, *frames.shape[-2:])
    return seg


def _first(groups: list, keyword: str):
    for group in groups:
        if group is not None and keyword in group and len(group[keyword].value):
            return group[keyword].value[0]
    return None


def _frame_segment(groups: list, segments: dict[int, str]) -> int | None:
    item = _first(groups, "SegmentIdentificationSequence")
    if item is not None and "ReferencedSegmentNumber" in item:
        return int(item.ReferencedSegmentNumber)
    return next(iter(segments)) if len(segments) == 1 else None


def _frame_source(groups: list) -> str | None:
    derivation = _first(groups, "DerivationImageSequence")
    if derivation is None:
        return None
    sources = derivation.get("SourceImageSequence") or []
    uid = sources[0].get("ReferencedSOPInstanceUID") if len(sources) else None
    return str(uid) if uid else None
