"""The DICOM Structured Report of a model's result: the output stage ``sr``
(``cxrtool predict --dicom sr``, ``predict(..., outputs=["sr"])``).

For each DICOM study and model the stage writes ``NAME.cxrtool.<model id>.sr.dcm`` in the
study's output folder (beside it, or under ``--out``) and lists it in the model's result
(``"outputs": {"sr": [...]}`` in the sidecar), so the one rule for stale files covers it
(:mod:`cxrtool.stages`): the SR goes when its result is replaced by one that does not list
it (``predict --overwrite`` without ``--dicom sr``), or goes stale (the study's file changed).

What the SR holds (a Comprehensive SR, SOP Class 1.2.840.10008.5.1.4.1.1.88.33, built with
highdicom, which checks each content item as it builds it; not a Comprehensive 3D SR: the
content has no 3D coordinates, more archives and viewers take the older class, and dciodvfy
finds both alike):

- Patient and study: the source's Patient module and General Study module attributes as
  the source has them (what makes the SR an instance of the same patient's same study: the
  same Study Instance UID), and nothing else of the source (no equipment, institution,
  Patient Study module: age, size, weight). An attribute those modules make Type 2 that the
  source lacks is present and empty. Unlike the sidecars (no patient ID unless
  ``--include-patient-id``), the SR carries the patient's identity: it belongs to that study.
- Series: a new one per study and model (its UID derived from the study's and the model's,
  so a model's SRs of one study share it), Modality SR, Series Number :data:`SERIES_NUMBER`;
  the SR's own SOP Instance UID is derived from the source image, the model, the result and
  the cxrtool version (the same result gives the same UID).
- Content, TID 1500 Measurement Report (title (126000, DCM, "Imaging Measurement Report")):
  the model as the observer device (TID 1004: a UID derived from its checkpoint's digest, its
  name, manufacturer "cxrtool", model name its architecture); procedure reported (43468-8,
  LN, "XR unspecified body region") (CID 100: the model does not check the body part); then
  one Measurement Group (TID 1501) per finding, in the model's order:

  - Tracking Identifier: the finding's name, and a Tracking UID (:func:`tracking_uid`; the
    DICOM SEG of the same result gives the finding's segment the same one: :mod:`cxrtool.reports.seg`);
  - Finding (121071, DCM): the finding's code (:func:`finding_code`: SNOMED CT or DCM where
    the standard has one, else :data:`LOCAL_SCHEME`);
  - Algorithm Identification (TID 4019): name = the model's name, version = the cxrtool
    version that made the result, parameters "model id ...", "model sha256 ...",
    "architecture ...", and where they apply "calibration {...}" with the finding's "raw
    probability ...", "zero-shot: ...", "predict settings {...}" (TTA, prompts);
  - the source image (its SOP Class and Instance UIDs; also in the Current Requested
    Procedure Evidence Sequence);
  - two measurements (TID 300), unitless (1, UCUM, "no units"): (122157, DCM, "Probability")
    = the probability the call is made on (the calibrated one for a calibrated model), and
    (122411, DCM, "Threshold Value") = the threshold it is called at;
  - a qualitative evaluation: the finding's code = (52101004, SCT, "Present") when the
    probability reaches the threshold, else (272519000, SCT, "Absent");

  and, for a result with explain's maps (``cxrtool explain --dicom sr``), after a finding's
  group, one Planar ROI Measurement Group (TID 1410) per region of its map, strongest first:
  Tracking Identifier "FINDING region K" (K: the region's value in explain's mask) with a
  Tracking UID of its own (:func:`region_uid`); Finding the finding's code; the same
  Algorithm Identification; the region as a closed POLYLINE on the source image, its outline
  traced from explain's mask (:func:`cxrtool.reports._roi.outline`; its box where the mask
  cannot be read, which the study's record says); measurements (42798000, SCT, "Area")
  (mm2 where the image's Pixel Spacing is known, else ``{pixels}``) and the map's peak and
  mean in it, as fractions of the map's peak (local codes "map peak", "map mean"). The
  regions are where the model's evidence lies, not an outline of the finding. The DICOM
  SEG of the same result (``--dicom sr,seg``) holds the same regions pixel for pixel, its
  segments tracked by the findings' Tracking UIDs.

A PNG or JPEG study has no DICOM study to add an SR to: the stage writes nothing for it and
says so in the study's record (``warnings``: one line). A DICOM the SR cannot be made for (no
UIDs to reference, a SOP Class highdicom does not know) gets the same one line. A study that
failed gets nothing. A study already done (skipped) whose SR is missing, or is not its stored
result's, gets it written from that result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrtool.io.records import FindingMap, Result
from cxrtool.reports._dicom import (
    FINDING_CODES,
    LOCAL_SCHEME,
    LOCAL_SCHEME_NAME,
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
from cxrtool.reports._dicom import source_header as _source_header
from cxrtool.reports._dicom import write_dicom as write_report
from cxrtool.stages import OutputKind, StudyOutcome

NAME = "sr"  # the stage's name: --dicom sr, result.outputs["sr"]
FILE_KIND = "sr.dcm"  # NAME.cxrtool.<model id>.sr.dcm
WHAT = "DICOM SR"  # as the study's record names it: "no DICOM SR: ..."

SERIES_NUMBER = 9001  # the SR series of each study and model
SERIES_DESCRIPTION = "cxrtool findings"

NoReport = NoDicom  # why a study gets no SR (one line, said in its record)


def instance_uid(source_uid: str, result: Result, version: str) -> str:
    """The SR's SOP Instance UID: the same for the same source image, model, result and
    cxrtool version (a rewritten SR of the same result is the same instance)."""
    findings = json.dumps({name: call.to_dict() for name, call in result.findings.items()}, sort_keys=True)
    parts = ["instance", source_uid, result.model.sha256, result.created, version, findings]
    if mapped(result):  # its regions are in it too (a result without them keeps the UID it always had)
        parts.append(json.dumps(result.explanations.to_dict(), sort_keys=True))  # type: ignore[union-attr]
    return derived_uid(*parts)


def mapped(result: Result) -> list[tuple[str, FindingMap]]:
    """The findings of a result whose regions the SR gives (explain's maps with regions), in
    the result's order."""
    if result.explanations is None:
        return []
    return [(name, entry) for name, entry in result.explanations.findings.items()
            if entry.regions and name in result.findings]


def region_uid(sop_uid: str, finding: str, label: int) -> str:
    """The Tracking UID of region ``label`` of a finding's map in the SR ``sop_uid``."""
    return derived_uid("tracking region", sop_uid, finding, str(label))


def read_outlines(folder: Path, study: str, result: Result,
                  shape: tuple[int, int]) -> tuple[dict[str, dict[int, Any]], list[str]]:
    """The outlines of a result's regions (:func:`cxrtool.reports._roi.outline`), from
    explain's masks of the study (its file's name) in ``folder`` (on the image's grid
    ``shape``): finding -> region label ->
    polygon; and, for each finding whose mask cannot be read, why (its regions then go in
    as their boxes)."""
    from cxrtool.io.outputs import owned_by
    from cxrtool.reports._roi import label_outlines

    outlines: dict[str, dict[int, Any]] = {}
    problems = []
    for finding, entry in mapped(result):
        name = entry.files.get("mask")
        try:
            if not name or not owned_by(name, study):
                raise NoDicom("explain wrote no mask for it")
            outlines[finding] = label_outlines(folder / name, [region.label for region in entry.regions], shape)
        except NoDicom as why:
            problems.append(f"{finding}: {why}")
    return outlines, problems


def tracking_uid(sop_uid: str, finding: str) -> str:
    """The Tracking UID of a finding's Measurement Group in the SR ``sop_uid``; the DICOM SEG
    of the same result gives the finding's segment the same one (:mod:`cxrtool.reports.seg`)."""
    return derived_uid("tracking", sop_uid, finding)


def _parameters(result: Result, finding: str) -> list[str]:
    model = result.model
    parameters = [f"model id {model.id}", f"model sha256 {model.sha256}"]
    if model.architecture:
        parameters.append(f"architecture {model.architecture}")
    call = result.findings[finding]
    if call.zero_shot:
        parameters.append("zero-shot: scored from a text description the model never trained on; uncalibrated, called at 0.5")
    elif result.calibration:
        parameters.append("calibration " + json.dumps(result.calibration, sort_keys=True))
        if call.raw_probability is not None:
            parameters.append(f"raw probability {call.raw_probability:g}")
    predict = result.settings.get("predict")
    if predict:
        parameters.append("predict settings " + json.dumps(predict, sort_keys=True))
    return parameters


def build_report(source: Any, result: Result, *, version: str,
                 outlines: Mapping[str, Mapping[int, Any]] | None = None) -> Any:
    """The SR (a ``highdicom.sr.ComprehensiveSR``) of a model's result on a DICOM image.

    Args:
        source: the image's header (a pydicom Dataset; its pixels are not needed).
        result: the model's result on it.
        version: the cxrtool version writing the SR (part of its SOP Instance UID).
        outlines: where the result has explain's maps, its regions' outlines
            (:func:`read_outlines`: finding -> region label -> polygon); a region without
            one goes in as its box.

    Raises:
        ValueError, TypeError, AttributeError, KeyError: a source highdicom cannot take.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    model = result.model
    algorithm_name = model.name or model.architecture or "cxrtool model"
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", model.sha256), name=algorithm_name[:64], manufacturer_name=MANUFACTURER,
            model_name=(model.architecture or algorithm_name)[:64]))
    unit = codes.UCUM.NoUnits
    sop_uid = instance_uid(str(source.SOPInstanceUID), result, version)
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)  # (it checks the source is an image)
    maps = dict(mapped(result))
    groups = []
    local = False
    for name, call in result.findings.items():
        value, scheme, meaning = finding_code(name)
        local = local or scheme == LOCAL_SCHEME
        concept = hd.sr.CodedConcept(value, scheme, meaning)
        algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=result.cxrtool_version or version,
                                                  parameters=_parameters(result, name))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(sop_uid, name), identifier=name[:64]),
            finding_type=concept,
            algorithm_id=algorithm,
            source_images=[image],
            measurements=[
                hd.sr.Measurement(name=codes.DCM.Probability, value=float(call.probability), unit=unit),
                hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(call.threshold), unit=unit),
            ],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=concept, value=codes.SCT.Present if call.positive else codes.SCT.Absent),
            ],
        ))
        entry = maps.get(name)
        if entry is not None:
            groups.extend(_region_groups(source, sop_uid, name, concept, algorithm, entry, (outlines or {}).get(name, {})))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.XRUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    made = created(result)
    with source_names_as_they_are():
        return hd.sr.ComprehensiveSR(
            evidence=[evidence(source)],
            content=report,
            series_instance_uid=derived_uid("series", str(source.StudyInstanceUID), model.sha256),
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=SERIES_DESCRIPTION,
            software_versions=version,
            content_date=made.date(),
            content_time=made.time().replace(microsecond=0),
            specific_character_set="ISO_IR 192",  # UTF-8: the model's and the findings' names may be any text
            coding_schemes=coding_schemes(local or bool(maps)),
        )


# The map's level in a region, as fractions of the map's peak (local codes: the standard
# has no concept of an activation map's value).
MAP_PEAK = ("map peak", LOCAL_SCHEME, "Map peak in region (fraction of the map's peak)")
MAP_MEAN = ("map mean", LOCAL_SCHEME, "Map mean in region (fraction of the map's peak)")


def _region_groups(source: Any, sop_uid: str, finding: str, concept: Any, algorithm: Any, entry: FindingMap,
                   outlines: Mapping[int, Any]) -> list[Any]:
    """A finding's regions as TID 1410 Planar ROI groups: each its outline (else its box),
    its area (mm2 where the image's spacing is known, else pixels), the map's peak and mean
    in it."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from cxrtool.reports._roi import box_polygon, pixel_area_unit, planar_group

    unit = codes.UCUM.NoUnits
    groups = []
    for region in entry.regions:
        area = (hd.sr.Measurement(name=codes.SCT.Area, value=float(region.area_mm2), unit=codes.UCUM.SquareMillimeter)
                if region.area_mm2 is not None else
                hd.sr.Measurement(name=codes.SCT.Area, value=float(region.area_px), unit=pixel_area_unit()))
        groups.append(planar_group(
            source, identifier=f"{finding} region {region.label}", uid=region_uid(sop_uid, finding, region.label),
            finding=concept, algorithm=algorithm,
            polygon=outlines.get(region.label) if region.label in outlines else box_polygon(region.box),
            measurements=[area,
                          hd.sr.Measurement(name=hd.sr.CodedConcept(*MAP_PEAK), value=float(region.peak), unit=unit),
                          hd.sr.Measurement(name=hd.sr.CodedConcept(*MAP_MEAN), value=float(region.mean), unit=unit)]))
    return groups


def source_header(path: Path, identity: Mapping[str, str]) -> Any:
    """The header of the DICOM image a result was made from.

    Raises:
        NoReport: a PNG or JPEG (no DICOM study), a file without the UIDs to reference, or one
            that is no longer the image the result was made from.
    """
    return _source_header(path, identity, WHAT)


class StructuredReports(DicomObjectStage):
    """The ``sr`` output stage: a DICOM SR of each DICOM study's result, listed in the result."""

    name, file_kind, what = NAME, FILE_KIND, WHAT

    def instance_uid(self, source_uid: str, result: Result) -> str:
        return instance_uid(source_uid, result, self.version)

    def build(self, outcome: StudyOutcome, source: Any, result: Result) -> Any:
        outlines: dict[str, dict[int, Any]] = {}
        if mapped(result):
            outlines, problems = read_outlines(outcome.folder, outcome.path.name, result,
                                               (int(source.Rows), int(source.Columns)))
            for problem in problems:
                outcome.notes.append(f"{WHAT}: the regions of {problem}: they are given as their boxes")
        return build_report(source, result, version=self.version, outlines=outlines)


STAGE = OutputKind(NAME, "a DICOM Structured Report (TID 1500) of each DICOM study's findings, in its study",
                   StructuredReports)

__all__ = ["FILE_KIND", "FINDING_CODES", "LOCAL_SCHEME", "LOCAL_SCHEME_NAME", "NAME", "SERIES_NUMBER", "STAGE",
           "NoReport", "StructuredReports", "build_report", "finding_code", "instance_uid", "source_header",
           "tracking_uid", "write_report"]
