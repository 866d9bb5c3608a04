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

  - Tracking Identifier: the finding's name, and a Tracking UID;
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
    probability reaches the threshold, else (272519000, SCT, "Absent").

A PNG or JPEG study has no DICOM study to add an SR to: the stage writes nothing for it and
says so in the study's record (``warnings``: one line). A DICOM the SR cannot be made for (no
UIDs to reference, a SOP Class highdicom does not know) gets the same one line. A study that
failed gets nothing. A study already done (skipped) whose SR is missing, or is not its stored
result's, gets it written from that result.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrtool.io.outputs import atomic_path
from cxrtool.io.records import Result
from cxrtool.registry import FINDING_ALIASES
from cxrtool.stages import OutputKind, StudyOutcome

NAME = "sr"  # the stage's name: --dicom sr, result.outputs["sr"]
FILE_KIND = "sr.dcm"  # NAME.cxrtool.<model id>.sr.dcm

# Findings with a code of their own, by name (lower case, "_" as a space; the registry's
# aliases first): (code value, coding scheme designator, code meaning). Each is a code the
# DICOM standard itself uses with that meaning (PS3.16, as pydicom's copy of it has it; the
# context groups it is in are named); no code is made up, and none whose meaning the
# standard's own tables disagree on (SCT 287272002 is "Cardiomegaly" in CID 12248 but
# "Enlarged septal foramen of heart" elsewhere: Cardiomegaly stays local).
FINDING_CODES: dict[str, tuple[str, str, str]] = {
    "effusion": ("60046008", "SCT", "Pleural effusion"),  # CID 8134; NIH's "Effusion", CheXpert's "Pleural Effusion"
    "pleural effusion": ("60046008", "SCT", "Pleural effusion"),
    "pneumothorax": ("36118008", "SCT", "Pneumothorax"),  # CID 6102 "Chest Finding or Feature Modifier"
    "nodule": ("27925004", "SCT", "Nodule"),  # CID 6102, 6104 "Abnormal Opacity Finding or Feature"
    "mass": ("4147007", "SCT", "Mass"),  # CID 6102, 6104
    "edema": ("19242006", "SCT", "Pulmonary edema"),  # CID 3700; NIH's and CheXpert's "Edema" (of the lungs)
    "pulmonary edema": ("19242006", "SCT", "Pulmonary edema"),
    "fibrosis": ("112674009", "SCT", "Fibrosis"),  # CID 6336 "MRI Abnormality" (the morphologic concept)
    "infiltration": ("112121", "DCM", "Infiltrate"),  # CID 6102, 6104
    "lung opacity": ("112001", "DCM", "Opacity"),  # CID 6102, 6104
}

# Every other finding (Atelectasis, Cardiomegaly, Consolidation, Pneumonia, Emphysema,
# Hernia, Pleural_Thickening, No Finding, Support Devices, zero-shot ones...) is coded in
# this private coding scheme (PS3.16 8.2: designators starting "99" are private): the code
# value is the finding's name as the model's card spells it, the meaning the same (at most
# 64 characters). The SR names the scheme in its Coding Scheme Identification Sequence.
LOCAL_SCHEME = "99CXRTOOL"
LOCAL_SCHEME_NAME = "cxrtool finding names (the model card's spelling)"

SERIES_NUMBER = 9001  # the SR series of each study and model
SERIES_DESCRIPTION = "cxrtool findings"
MANUFACTURER = "cxrtool"
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "cxrtool.reports.sr")  # of the UIDs derived here (_uid)


class NoReport(Exception):
    """Why a study gets no SR (one line, said in its record)."""


def finding_code(name: str) -> tuple[str, str, str]:
    """The code of a finding: (value, scheme designator, meaning): from :data:`FINDING_CODES`,
    else the finding's own name in :data:`LOCAL_SCHEME`."""
    key = FINDING_ALIASES.get(name, name).replace("_", " ").strip().lower()
    if key in FINDING_CODES:
        return FINDING_CODES[key]
    text = " ".join(name.replace("\\", "/").split()) or "unnamed"
    return text, LOCAL_SCHEME, text[:64]


def _require_highdicom() -> None:
    from cxrtool.errors import UsageError

    try:
        import highdicom
    except ImportError:
        raise UsageError('the DICOM SR (--dicom sr) needs highdicom: pip install "cxrtool[dicom]"') from None
    try:
        _patient_and_study_keywords()
    except (ImportError, KeyError):
        raise UsageError(f"the DICOM SR (--dicom sr) needs a newer highdicom than {highdicom.__version__} "
                         "(0.28 is known to work): pip install -U highdicom") from None


@functools.lru_cache(maxsize=1)
def _patient_and_study_keywords() -> frozenset[str]:
    """The root attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1),
    as highdicom's tables of the standard list them (the tables its own copying uses)."""
    from highdicom._standard_utils import get_module_attribute_map

    modules = get_module_attribute_map()
    return frozenset(entry["keyword"] for module in ("patient", "general-study") for entry in modules[module]
                     if not entry["path"])


# What highdicom reads from the source (Type 2 in the SR IODs: present, if empty).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
_REFERENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def _evidence(source: Any) -> Any:
    """The part of the source's header the SR may take: the UIDs that reference it, and its
    Patient and General Study module attributes (the Type 2 ones it lacks, empty)."""
    from pydicom import Dataset

    kept = Dataset()
    for keyword in _REFERENCE:
        kept.add(source[keyword])
    for keyword in sorted(_patient_and_study_keywords()):
        if keyword in source:
            kept.add(source[keyword])
    for keyword in _TYPE2:
        if keyword not in kept:
            setattr(kept, keyword, None)
    return kept


def _uid(*parts: str) -> str:
    """A UID derived from ``parts``: ``2.25.`` and a name-based (SHA-1, version 5) UUID as an
    integer (PS3.5 B.2); the same parts always give the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def instance_uid(source_uid: str, result: Result, version: str) -> str:
    """The SR's SOP Instance UID: the same for the same source image, model, result and
    cxrtool version (a rewritten SR of the same result is the same instance)."""
    findings = json.dumps({name: call.to_dict() for name, call in result.findings.items()}, sort_keys=True)
    return _uid("instance", source_uid, result.model.sha256, result.created, version, findings)


def _created(result: Result) -> _dt.datetime:
    """When the result was made, in this machine's local time (DICOM's dates carry no zone)."""
    try:
        return _dt.datetime.fromisoformat(result.created).astimezone().replace(tzinfo=None)
    except (TypeError, ValueError):
        return _dt.datetime.now()


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


def build_report(source: Any, result: Result, *, version: str) -> Any:
    """The SR (a ``highdicom.sr.ComprehensiveSR``) of a model's result on a DICOM image.

    Args:
        source: the image's header (a pydicom Dataset; its pixels are not needed).
        result: the model's result on it.
        version: the cxrtool version writing the SR (part of its SOP Instance UID).

    Raises:
        ValueError, TypeError, AttributeError, KeyError: a source highdicom cannot take.
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes

    evidence = _evidence(source)
    model = result.model
    algorithm_name = model.name or model.architecture or "cxrtool model"
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=_uid("device", model.sha256), name=algorithm_name[:64], manufacturer_name=MANUFACTURER,
            model_name=(model.architecture or algorithm_name)[:64]))
    unit = codes.UCUM.NoUnits
    sop_uid = instance_uid(str(source.SOPInstanceUID), result, version)
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)  # (it checks the source is an image)
    groups = []
    local = False
    for name, call in result.findings.items():
        value, scheme, meaning = finding_code(name)
        local = local or scheme == LOCAL_SCHEME
        concept = hd.sr.CodedConcept(value, scheme, meaning)
        algorithm = hd.sr.AlgorithmIdentification(name=algorithm_name, version=result.cxrtool_version or version,
                                                  parameters=_parameters(result, name))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid("tracking", sop_uid, name), identifier=name[:64]),
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
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.XRUnspecifiedBodyRegion,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    schemes = [CodingSchemeIdentificationItem(designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME,
                                                    responsible_organization=MANUFACTURER)] if local else None
    made = _created(result)
    with warnings.catch_warnings():  # the patient's name is the source's, as it has it: not ours to judge
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name", category=UserWarning)
        return hd.sr.ComprehensiveSR(
            evidence=[evidence],
            content=report,
            series_instance_uid=_uid("series", str(source.StudyInstanceUID), model.sha256),
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
            coding_schemes=schemes,
        )


def _read_header(path: Path) -> Any:
    """The header of a DICOM file (no pixels).

    Raises:
        NoReport: it cannot be read as DICOM.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    from cxrtool.io.images import open_capped
    from cxrtool.io.studies import StudyReadError, one_line

    try:
        with open_capped(path) as handle:
            try:
                return pydicom.dcmread(handle, stop_before_pixels=True)
            except InvalidDicomError:  # no preamble: read as a dataset (predict took it for DICOM)
                handle.seek(0)
                return pydicom.dcmread(handle, stop_before_pixels=True, force=True)
    except StudyReadError as error:
        raise NoReport(f"the file cannot be read again: {error}") from None
    except Exception as error:  # noqa: BLE001 - any failure of pydicom's on a header: said, the run goes on
        raise NoReport(f"its DICOM header cannot be read: {one_line(str(error)) or type(error).__name__}") from None


def source_header(path: Path, identity: Mapping[str, str]) -> Any:
    """The header of the DICOM image a result was made from.

    Raises:
        NoReport: a PNG or JPEG (no DICOM study), a file without the UIDs to reference, or one
            that is no longer the image the result was made from.
    """
    kind = identity.get("format")
    if kind in ("png", "jpeg"):
        raise NoReport(f"a {kind.upper()} file has no DICOM study to add a DICOM SR to")
    source = _read_header(path)
    missing = [keyword for keyword in _REFERENCE if not str(source.get(keyword, "") or "").strip()]
    if missing:
        raise NoReport(f"the DICOM file has no {', '.join(missing)} to reference")
    expected = identity.get("sop_instance_uid")
    if expected and str(source.SOPInstanceUID) != expected:
        raise NoReport("the file is no longer the image the result was made from (another SOP Instance UID)")
    return source


def _is_current(path: Path, uid: str) -> bool:
    """Whether the SR at ``path`` is the one of the result (its SOP Instance UID is ``uid``)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # noqa: BLE001 - unreadable, a link, gone: not current, written again
        return False
    return not path.is_symlink() and str(header.get("SOPInstanceUID", "")) == uid


def write_report(document: Any, path: Path) -> Path:
    """Write an SR atomically (never through a link).

    Raises:
        OutputError: the place cannot take it.
    """
    with atomic_path(path) as tmp:
        document.save_as(tmp, enforce_file_format=True)
    return path


class StructuredReports:
    """The ``sr`` output stage: a DICOM SR of each DICOM study's result, listed in the result."""

    def __init__(self, context: Any) -> None:
        _require_highdicom()
        self.version = str(context.version)

    def study(self, outcome: StudyOutcome) -> None:
        result = outcome.result
        if outcome.status == "failed" or result is None:
            return
        from cxrtool.io.studies import one_line

        name = outcome.output_name(FILE_KIND)
        record = outcome.record or outcome.sidecar
        try:
            source = source_header(outcome.path, record.identity if record is not None else {})
        except NoReport as why:
            outcome.notes.append(f"no DICOM SR: {why}")
            return
        path = outcome.folder / name
        uid = instance_uid(str(source.SOPInstanceUID), result, self.version)
        if outcome.status == "skipped" and result.outputs.get(NAME) == [name] and _is_current(path, uid):
            return  # done before, and still there
        try:
            document = build_report(source, result, version=self.version)
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            outcome.notes.append(f"no DICOM SR: highdicom cannot make one of this file: "
                                 f"{one_line(str(error)) or type(error).__name__}")
            return
        write_report(document, path)
        outcome.wrote(NAME, [name])

    def finish(self) -> list[Path]:
        return []


STAGE = OutputKind(NAME, "a DICOM Structured Report (TID 1500) of each DICOM study's findings, in its study",
                   StructuredReports)

__all__ = ["FILE_KIND", "FINDING_CODES", "LOCAL_SCHEME", "NAME", "SERIES_NUMBER", "STAGE", "NoReport",
           "StructuredReports", "build_report", "finding_code", "instance_uid", "source_header", "write_report"]
