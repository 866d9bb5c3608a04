"""The DICOM Segmentation of explain's regions: the output stage ``seg``
(``cxrtool explain --dicom seg``, ``explain(..., outputs=["seg"])``).

For each DICOM study and model whose maps have regions the stage writes
``NAME.cxrtool.<model id>.seg.dcm`` in the study's output folder (beside it, or under
``--out``) and lists it in the model's result (``"outputs": {"seg": [...]}`` in the
sidecar), so the one rule for stale files covers it (:mod:`cxrtool.stages`), as the SR's
(:mod:`cxrtool.reports.sr`). It is made from explain's masks (``*.mask.png``: the study's
own pixel grid, value k for region k), which the chunk processor has written before the
study reaches the output stages; a study already explained (skipped) gets its SEG from the
stored result's masks. ``predict`` makes no maps: it refuses the stage (:data:`NEEDS_MAPS`).

What the SEG holds (Segmentation Storage, 1.2.840.10008.5.1.4.1.1.66.4, built with
highdicom, which checks it as it builds it):

- Patient and study: the source's Patient and General Study module attributes as the
  source has them, and nothing else of the source (:func:`cxrtool.reports._dicom.evidence`,
  as the SR); the same Study Instance UID.
- Series: a new one per study and model (derived from the study's and the model's UIDs),
  Modality SEG, Series Number :data:`SERIES_NUMBER`; its SOP Instance UID is derived from
  the source image, the model, the result, its maps and the cxrtool version.
- Image: BINARY, one single-bit frame per segment, pixel for pixel on the source image (its
  Rows and Columns), which each frame references (Derivation Image, Source Image, Referenced
  Series); the source's Frame of Reference UID where it has one; Pixel Measures with the
  source's Pixel Spacing where it has one (none else: an Imager Pixel Spacing is at the
  detector, and a SEG's Pixel Spacing says "in the patient"; none either where the source
  has a Frame of Reference and no Slice Thickness, as radiographs do: the standard then
  asks for one); the source's Patient Orientation (empty where it has none); Lossy Image
  Compression as the source's (a mask derived from a lossy image says so, as the standard
  asks). highdicom 0.28's reader (``segread``) refuses Pixel Measures without a Slice
  Thickness, though its writer makes them and the standard allows them: read such a SEG
  with pydicom, or :func:`cxrtool.io.seg.read_seg` (what ``cxrtool radiomics`` reads).
- Segments: one per finding whose map has regions (all of them in one segment), in the
  result's order: label the finding's name; category (49755003, SCT, "Morphologically
  Abnormal Structure") (CID 7150); type the finding's code (:func:`finding_code`: SNOMED CT
  or DCM where the standard has one, else the local scheme ``99CXRTOOL``, declared in the
  Coding Scheme Identification Sequence); algorithm type AUTOMATIC, the algorithm
  identification: name = the model's name, family (123110, DCM, "Artificial
  Intelligence"), version = the cxrtool version that made the result, parameters "model
  id", "model sha256", "architecture", "map" (the method), "layer", "regions" (the
  threshold asked); Tracking ID the finding's name and Tracking UID the one of the
  finding's Measurement Group in the SR of the same result (:func:`cxrtool.reports.sr.tracking_uid`:
  the SR and SEG of a result name the same tracked finding); Segment Description: what the
  regions are (where the model's evidence lies, cut at what level of the map's peak: not
  an outline of the finding), the model's call, and a map that is not on the chest.

A study whose maps have no region (no positive finding, or maps that are zero everywhere)
gets no SEG, and its record says so in one line (``warnings``); so does a PNG or JPEG study
(no DICOM study), a DICOM highdicom cannot take, or a mask that is missing or not on the
image's grid. A study that failed gets nothing. A study already done (skipped) whose SEG is
missing, or is not its stored result's, gets it written from that result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.io.records import FindingMap, Result
from cxrtool.reports._dicom import (
    LOCAL_SCHEME,
    MANUFACTURER,
    DicomObjectStage,
    NoDicom,
    coding_schemes,
    created,
    derived_uid,
    evidence,
    finding_code,
    source_names_as_they_are,
)
from cxrtool.reports.sr import instance_uid as sr_instance_uid
from cxrtool.reports.sr import tracking_uid
from cxrtool.stages import OutputKind, StudyOutcome

NAME = "seg"  # the stage's name: --dicom seg, result.outputs["seg"]
FILE_KIND = "seg.dcm"  # NAME.cxrtool.<model id>.seg.dcm
WHAT = "DICOM SEG"  # as the study's record names it: "no DICOM SEG: ..."

SERIES_NUMBER = 9002  # the SEG series of each study and model (the SR's is 9001)
SERIES_DESCRIPTION = "cxrtool evidence regions"
CONTENT_LABEL = "CXRTOOL_REGIONS"  # (CS, at most 16 characters)
CONTENT_DESCRIPTION = "Regions of a model's activation maps: where its evidence lies"  # (LO: at most 64)
NEEDS_MAPS = "seg needs explain's maps: use cxrtool explain --dicom seg"


def segmented(result: Result) -> list[tuple[str, FindingMap]]:
    """The findings of a result that get a segment: those whose map has regions (and a mask),
    in the result's order."""
    if result.explanations is None:
        return []
    return [(name, entry) for name, entry in result.explanations.findings.items()
            if entry.regions and entry.files.get("mask")]


def instance_uid(source_uid: str, result: Result, version: str) -> str:
    """The SEG's SOP Instance UID: the same for the same source image, model, result, maps
    and cxrtool version (a rewritten SEG of the same result is the same instance)."""
    maps = json.dumps(result.explanations.to_dict() if result.explanations is not None else None, sort_keys=True)
    calls = json.dumps({name: call.to_dict() for name, call in result.findings.items()}, sort_keys=True)
    return derived_uid("seg instance", source_uid, result.model.sha256, result.created, version, calls, maps)


def read_masks(folder: Path, study: str, findings: list[tuple[str, FindingMap]], shape: tuple[int, int]) -> np.ndarray:
    """The findings' masks, binarised (any region), stacked as highdicom takes a single
    image's segments: (1, rows, columns, segments), uint8.

    Raises:
        NoDicom: a mask that is missing, unreadable, not the study's, or not on its grid.
    """
    from cxrtool.io.outputs import owned_by
    from cxrtool.reports._roi import read_label_image

    layers = []
    for finding, entry in findings:
        name = entry.files["mask"]
        if not owned_by(name, study):
            raise NoDicom(f"the mask of {finding} ({name}) is not there: explain the study again (--overwrite)")
        layers.append(read_label_image(folder / name, shape, f"the mask of {finding} ({name})") > 0)
    return np.stack(layers, axis=-1)[np.newaxis].astype(np.uint8)


def _spacing(source: Any) -> list[float] | None:
    """The source's Pixel Spacing (row, column), where it has a usable one."""
    import math

    try:
        values = [float(v) for v in source.get("PixelSpacing") or []]
    except (TypeError, ValueError):
        return None
    return values if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values) else None


# What highdicom takes from the source image besides its evidence: its grid, its frame of
# reference and position where it has them, and whether its pixels were compressed lossily.
_IMAGE = ("Rows", "Columns", "NumberOfFrames", "FrameOfReferenceUID", "PositionReferenceIndicator",
          "ImagePositionPatient", "ImageOrientationPatient", "SliceThickness", "LossyImageCompression",
          "LossyImageCompressionRatio", "LossyImageCompressionMethod")


def _image_source(source: Any) -> Any:
    kept = evidence(source)
    for keyword in _IMAGE:
        if keyword in source and source[keyword].value not in (None, ""):
            kept.add(source[keyword])
    spacing = _spacing(source)
    # Pixel Measures with a Frame of Reference need a Slice Thickness (PS3.3 C.7.6.16.2.1),
    # which a radiograph has none of: then none (the SEG lies on the source's grid anyway).
    if spacing is not None and ("FrameOfReferenceUID" not in kept or "SliceThickness" in kept):
        kept.PixelSpacing = spacing
    return kept


def _parameters(result: Result) -> dict[str, str]:
    model, explanation = result.model, result.explanations
    parameters = {"model id": model.id, "model sha256": model.sha256}
    if model.architecture:
        parameters["architecture"] = model.architecture
    if explanation is not None:
        parameters["map"] = explanation.method
        if isinstance(explanation.layer, str):
            parameters["layer"] = explanation.layer
        if "threshold" in explanation.request:
            threshold = explanation.request["threshold"]
            parameters["regions"] = threshold if isinstance(threshold, str) else f"{threshold:g} of the map's peak"
    return parameters


def _description(result: Result, finding: str, entry: FindingMap) -> str:
    from cxrtool.registry import CAM_METHOD_LABELS

    method = result.explanations.method if result.explanations is not None else ""
    call = result.findings.get(finding)
    count = len(entry.regions)
    text = (f"{finding}: the {count} {'region' if count == 1 else 'regions'} of the model's "
            f"{CAM_METHOD_LABELS.get(method, method)} map")
    if entry.threshold is not None:
        text += f" at or above {entry.threshold:g} of its peak"
    text += ", where the model's evidence for the finding lies (not an outline of the finding)"
    if call is not None:
        text += (f"; the model calls it {'present' if call.positive else 'absent'} "
                 f"(probability {call.probability:.3f}, threshold {call.threshold:g})")
    if entry.outside_chest:
        text += f"; the map does not lie on the chest: {entry.trust.get('reason') or 'see the overlay'}"
    return text


def build_segmentation(source: Any, result: Result, masks: np.ndarray, *, version: str) -> Any:
    """The SEG (a ``highdicom.seg.Segmentation``) of a result's regions on a DICOM image.

    Args:
        source: the image's header (a pydicom Dataset; its pixels are not needed).
        result: the model's result on it, with explain's maps.
        masks: :func:`read_masks` of the findings :func:`segmented` gives, in that order.
        version: the cxrtool version writing the SEG (part of its SOP Instance UID).

    Raises:
        ValueError, TypeError, AttributeError, KeyError: a source highdicom cannot take.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    findings = segmented(result)
    if masks.shape[-1] != len(findings) or not findings:
        raise ValueError(f"{masks.shape[-1]} masks for {len(findings)} segmented findings")
    model = result.model
    algorithm = hd.AlgorithmIdentificationSequence(
        name=(model.name or model.architecture or "cxrtool model")[:64], family=codes.cid7162.ArtificialIntelligence,
        version=(result.cxrtool_version or version)[:64], source=MANUFACTURER, parameters=_parameters(result))
    source_uid = str(source.SOPInstanceUID)
    report = sr_instance_uid(source_uid, result, version)  # the SR of the same result: its findings' Tracking UIDs
    descriptions = []
    local = False
    for number, (finding, entry) in enumerate(findings, start=1):
        value, scheme, meaning = finding_code(finding)
        local = local or scheme == LOCAL_SCHEME
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=finding[:64],
            segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
            segmented_property_type=hd.sr.CodedConcept(value, scheme, meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid(report, finding),
            tracking_id=finding[:64],
        )
        description.SegmentDescription = _description(result, finding, entry)
        descriptions.append(description)
    made = created(result)
    with source_names_as_they_are():
        segmentation = hd.seg.Segmentation(
            source_images=[_image_source(source)],
            pixel_array=masks,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=derived_uid("seg series", str(source.StudyInstanceUID), model.sha256),
            series_number=SERIES_NUMBER,
            sop_instance_uid=instance_uid(source_uid, result, version),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=(model.name or model.architecture or "cxrtool model")[:64],
            software_versions=version,
            device_serial_number=model.id,
            content_label=CONTENT_LABEL,
            content_description=CONTENT_DESCRIPTION,
            omit_empty_frames=False,  # one frame per segment, always (each has regions)
            series_description=SERIES_DESCRIPTION,
            content_date=made.date(),
            content_time=made.time().replace(microsecond=0),
            specific_character_set="ISO_IR 192",  # UTF-8: the model's and the findings' names may be any text
            coding_schemes=coding_schemes(local),
        )
    # Type 2C in the General Image module where there is no patient position (a radiograph's
    # case): the mask lies on the source's grid, so it has the source's orientation.
    if "ImageOrientationPatient" not in source:
        segmentation.PatientOrientation = source.get("PatientOrientation") or None
    return segmentation


class Segmentations(DicomObjectStage):
    """The ``seg`` output stage: a DICOM SEG of each DICOM study's regions, listed in the result."""

    name, file_kind, what = NAME, FILE_KIND, WHAT

    def __init__(self, context: Any) -> None:
        from cxrtool.errors import UsageError

        if context is not None and "explain" not in (context.settings or {}):
            raise UsageError(NEEDS_MAPS)
        super().__init__(context)

    def instance_uid(self, source_uid: str, result: Result) -> str:
        return instance_uid(source_uid, result, self.version)

    def nothing_to_write(self, result: Result) -> str | None:
        if segmented(result):
            return None
        mapped = result.explanations is not None and bool(result.explanations.findings)
        return "no map has regions (each is zero everywhere)" if mapped else "nothing was mapped (no positive finding)"

    def build(self, outcome: StudyOutcome, source: Any, result: Result) -> Any:
        findings = segmented(result)
        masks = read_masks(outcome.folder, outcome.path.name, findings, (int(source.Rows), int(source.Columns)))
        return build_segmentation(source, result, masks, version=self.version)


STAGE = OutputKind(NAME, "a DICOM Segmentation of each DICOM study's explain regions (a segment per finding), "
                         "in its study", Segmentations)

__all__ = ["CONTENT_LABEL", "FILE_KIND", "NAME", "NEEDS_MAPS", "SERIES_NUMBER", "STAGE", "Segmentations",
           "build_segmentation", "instance_uid", "read_masks", "segmented"]
