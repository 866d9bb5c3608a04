"""The DICOM Structured Report of radiomics' regions (``cxrtool radiomics ... --dicom sr``):
each region's PyRadiomics features as measurements of that region, coded as pyradiomics-dcm
codes them.

Which SRs: one per DICOM image, model and folder among the table's rows that were measured
(status ok): ``NAME.cxrtool.<model id>.radiomics.sr.dcm`` for explain's CAM regions of a
model (in the folder of explain's masks: the study's output folder, beside its SR and
SEG), ``NAME.cxrtool.radiomics.sr.dcm`` for other regions (beside the mask they were
measured in: a DICOM SEG's folder, a ``NAME.mask.png``'s; whole images: beside the image).
PNG and JPEG images have no DICOM study: their regions get none (counted). The SR's SOP
Instance UID is derived from the source image and the rows it holds (their features and
what they were measured on, :func:`instance_uid`): an SR that is already that instance is
left alone (already done); one whose rows changed is written again; one whose rows all
failed now (a changed image that can no longer be measured) is removed (stale). An SR holds
the rows of the table the run wrote (every run's rows in it, as the table does): runs of the
same images into two tables write the same SRs, each with its own table's regions.

What the SR holds (a Comprehensive SR, as :mod:`cxrtool.reports.sr`; the same patient and
study as the source image, nothing else of it: :func:`cxrtool.reports._dicom.evidence`):
TID 1500 with the observer device "cxrtool radiomics" and one Planar ROI Measurement Group
(TID 1410) per region, in the table's order:

- Tracking Identifier: "FINDING region K" for a CAM region, the segment's label (or
  "segment K") for a SEG's, "LABEL K of MASK" for a mask file's, "whole image"; a Tracking
  UID of its own;
- Finding: the finding's code for a CAM region (:func:`cxrtool.reports._dicom.finding_code`),
  the segment's Segmented Property Type for a SEG's; none for a mask file's;
- Algorithm Identification: PyRadiomics and its version, parameters the cxrtool version
  and the digest of the table's settings (the journal's header holds them);
- the region: a SEG's segment by reference (Referenced Segmentation Frame, the SEG in the
  evidence); else its outline as a closed polyline on the image
  (:func:`cxrtool.reports._roi.outline`; the whole image's border for a whole image);
- one measurement (TID 300) per feature, as pyradiomics-dcm codes it: the IBSI code and
  meaning where the feature has one (:data:`IBSI_SCHEME`, the table in
  ``resources/ibsi_features.tsv``), else a private code (:data:`PRIVATE_SCHEME`: the value
  the first 6 characters of the base64 SHA-1 of "class_Feature", the meaning "class_Feature");
  a filtered image's feature (``log-sigma-...``, ``wavelet-LH``, ``square``...) carries
  concept modifiers (private "Image transformation" = "Laplacian of Gaussian" and its
  "Kernel size" / "Wavelet transformation" and its "Wavelet sub-band"...); unitless (1,
  UCUM, "no units"), as pyradiomics-dcm writes them (the table's diagnostics give the
  spacing the shape features were measured in). A value that is not finite (PyRadiomics
  gives NaN for degenerate regions) is left out, as pyradiomics-dcm does.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrtool.io.outputs import RADIOMICS_SR_KIND
from cxrtool.reports._dicom import (
    LOCAL_SCHEME,
    MANUFACTURER,
    NoDicom,
    created,
    derived_uid,
    evidence,
    finding_code,
    is_current,
    require_highdicom,
    source_header,
    source_names_as_they_are,
    write_dicom,
)

FILE_KIND = RADIOMICS_SR_KIND  # NAME.cxrtool[.<model id>].radiomics.sr.dcm (io.outputs.is_own_output knows it)
WHAT = "DICOM SR"
SERIES_NUMBER = 9003  # (the findings' SR is 9001, the SEG 9002)
SERIES_DESCRIPTION = "cxrtool radiomics"
IBSI_SCHEME = "IBSI"
IBSI_SCHEME_NAME = "Image Biomarker Standardisation Initiative"
PRIVATE_SCHEME = "99PYRADIOMICS"
PRIVATE_SCHEME_NAME = "PyRadiomics features and filters without an IBSI code (pyradiomics-dcm's codes)"
# The columns of a row that are not features.
_NOT_FEATURES = ("image", "mask", "label", "finding", "region", "model", "status", "error")


@functools.lru_cache(maxsize=1)
def ibsi_codes() -> dict[tuple[str, str], tuple[str, str]]:
    """(PyRadiomics class, feature) -> (IBSI code, IBSI meaning)."""
    from importlib.resources import files

    table: dict[tuple[str, str], tuple[str, str]] = {}
    lines = files("cxrtool.resources").joinpath("ibsi_features.tsv").read_text(encoding="utf-8").splitlines()
    for line in lines:
        if line.startswith("#") or line.startswith("class\t") or not line.strip():
            continue
        kind, feature, code, meaning = line.split("\t")
        table[(kind, feature)] = (code, meaning)
    return table


def private_code(text: str) -> tuple[str, str, str]:
    """pyradiomics-dcm's private code of a concept it has no standard code for."""
    value = base64.b64encode(hashlib.sha1(text.encode("utf-8")).digest()).decode("ascii")[:6]
    return value, PRIVATE_SCHEME, text


_TRANSFORMATION = private_code("Image transformation")
_SIMPLE_FILTERS = {"square": "Square transformation", "squareroot": "Square root transformation",
                   "logarithm": "Logarithm transformation", "gradient": "Gradient magnitude transformation",
                   "exponential": "Exponent transformation"}
_LOG = re.compile(r"log-sigma-(\d+)-(\d+)-([a-z]+)")
# pyradiomics-dcm knows the sub-bands of 2D and 3D decompositions (LH, HLL...); PyRadiomics
# names those of a 2D radiograph's (force2D) decomposition by one letter (wavelet-H, wavelet-L).
_WAVELET = re.compile(r"wavelet-([HL]{1,3})$")


def modifiers(prefix: str) -> list[tuple[tuple[str, str, str], tuple[str, str, str]]] | None:
    """The concept modifiers of the image a feature was measured on (PyRadiomics' column
    prefix: ``original``, ``log-sigma-1-0-mm-3D``, ``wavelet-LH``...), as pyradiomics-dcm
    gives them; None for a filter it does not know (the feature is left out)."""
    if prefix == "original":
        return []
    if prefix in _SIMPLE_FILTERS:
        return [(_TRANSFORMATION, private_code(_SIMPLE_FILTERS[prefix]))]
    wavelet = _WAVELET.match(prefix)
    if wavelet:
        return [(_TRANSFORMATION, private_code("Wavelet transformation")),
                (private_code("Wavelet sub-band"), private_code(wavelet.group(1)))]
    log = _LOG.match(prefix)
    if log:
        sigma = f"{log.group(1)}.{log.group(2)} {log.group(3)}"
        return [(_TRANSFORMATION, private_code("Laplacian of Gaussian")),
                (private_code("Kernel size"), private_code(sigma))]
    return None


def feature_code(column: str) -> tuple[tuple[str, str, str], list[Any]] | None:
    """A feature column (``PREFIX_class_Feature``) as (its quantity's code, its modifiers);
    None for a column that is not a feature of a known image type."""
    parts = column.split("_")
    if len(parts) != 3 or not all(parts):
        return None
    prefix, kind, feature = parts
    found = modifiers(prefix)
    if found is None:
        return None
    code = ibsi_codes().get((kind, feature))
    quantity = (code[0], IBSI_SCHEME, code[1]) if code else private_code(f"{kind}_{feature}")
    return quantity, found


def features_of(row: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """A table row's feature columns and values (not its identity, diagnostics or provenance)."""
    for key, value in row.items():
        if key not in _NOT_FEATURES and not key.startswith("diagnostics_") and not key.startswith("_"):
            yield key, value


def report_name(image: str, model: str) -> str:
    """``NAME.cxrtool.<model id>.radiomics.sr.dcm`` (no model: ``NAME.cxrtool.radiomics.sr.dcm``)."""
    from cxrtool.io.outputs import output_stem

    return f"{output_stem(Path(image).name)}.cxrtool.{model + '.' if model else ''}{FILE_KIND}"


def report_folder(row: Mapping[str, Any]) -> Path:
    """Where a row's SR goes: beside the mask it was measured in (explain's masks lie in the
    study's output folder), beside the image for a whole image."""
    return Path(row["mask"]).parent if row.get("mask") else Path(row["image"]).parent


def _identity(row: Mapping[str, Any]) -> dict[str, Any]:
    """What of a row its SR says: the region, when it was measured on which content (the
    files' digests, the settings), and its features."""
    provenance = row.get("_provenance") or {}
    inputs = {role: (fingerprint or {}).get("sha256") for role, fingerprint in (provenance.get("inputs") or {}).items()}
    return {**{key: row.get(key) for key in _NOT_FEATURES}, "measured": row.get("_measured"), "inputs": inputs,
            "settings": provenance.get("settings"), "features": dict(features_of(row))}


def instance_uid(source_uid: str, model: str, rows: Sequence[Mapping[str, Any]], version: str) -> str:
    """The SR's SOP Instance UID: the same for the same image, model, rows (their features,
    when and on what content they were measured) and cxrtool version."""
    digest = hashlib.sha256(json.dumps([_identity(row) for row in rows], sort_keys=True, default=str).encode()).hexdigest()
    return derived_uid("radiomics instance", source_uid, model, version, digest)


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _measurement(column: str, value: float) -> Any:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    coded = feature_code(column)
    if coded is None:
        return None
    quantity, found = coded
    measurement = hd.sr.Measurement(name=hd.sr.CodedConcept(*quantity), value=value, unit=codes.UCUM.NoUnits)
    if found:
        item = measurement[0]
        if "ContentSequence" not in item:
            item.ContentSequence = []
        for name, modifier in found:
            item.ContentSequence.append(hd.sr.CodeContentItem(
                name=hd.sr.CodedConcept(*name), value=hd.sr.CodedConcept(*modifier),
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD))
    return measurement


def _segment(header: Any, parsed: Any, number: int, source_uid: str) -> tuple[list[int], Any] | None:
    """A SEG's segment on the image: (its frames, its Segment Sequence item); None where the
    SEG cannot be referenced by frame (a label map, no frame of it on the image). ``parsed``
    is the SEG as cxrtool's reader has it (:func:`cxrtool.io.seg.read_seg`: each frame's
    segment and source image), ``header`` its header."""
    items = {int(item.SegmentNumber): item for item in header.get("SegmentSequence", [])}
    frames = [index for index, (segment, source) in enumerate(zip(parsed.frame_segments, parsed.frame_sources,
                                                                  strict=True), start=1)
              if segment == number and source in (None, source_uid)]
    return (frames, items[number]) if frames and number in items else None


def _region(row: Mapping[str, Any], source: Any, segs: dict[str, Any]) -> tuple[dict[str, Any], Any, str]:
    """Where a row's region is (planar_group's polygon= or segment=), its finding type, and
    its tracking identifier.

    Raises:
        NoDicom: its mask cannot be read again.
    """
    import highdicom as hd

    from cxrtool.radiomics.sources import _seg_or_none, read_mask
    from cxrtool.reports._roi import box_polygon, outline

    label = int(row.get("label") or 1)
    mask = row.get("mask")
    if row.get("finding") and row.get("model"):  # explain's region of a finding
        finding = hd.sr.CodedConcept(*finding_code(str(row["finding"])))
        name = f"{row['finding']} region {row.get('region') or label}"
    else:
        finding, name = None, "whole image" if not mask else f"label {label} of {Path(mask).name}"
    if not mask:
        return {"polygon": box_polygon([0, 0, int(source.Columns), int(source.Rows)])}, finding, name
    parsed = _seg_or_none(mask)
    if parsed is not None:
        from cxrtool.reports._dicom import read_header

        if mask not in segs:
            segs[mask] = read_header(Path(mask))
        seg = segs[mask]
        found = _segment(seg, parsed, label, str(source.SOPInstanceUID))
        if found is not None:
            frames, item = found
            kind = item.get("SegmentedPropertyTypeCodeSequence")
            if kind:
                finding = hd.sr.CodedConcept(str(kind[0].CodeValue), str(kind[0].CodingSchemeDesignator),
                                             str(kind[0].CodeMeaning))
            name = str(item.get("SegmentLabel") or f"segment {label}")
            return {"segment": (seg, label, frames)}, finding, name
    try:
        pixels = read_mask(mask, label=label, image_uid=str(source.SOPInstanceUID))
    except (OSError, ValueError) as error:
        raise NoDicom(f"its mask cannot be read again: {error}") from None
    polygon = outline(pixels == label)
    if polygon is None:
        raise NoDicom(f"its mask holds no label {label}")
    return {"polygon": polygon}, finding, name


def build_report(source: Any, model: str, rows: Sequence[Mapping[str, Any]], *, version: str,
                 pyradiomics: str) -> tuple[Any, int]:
    """The SR of the regions ``rows`` (measured table rows) of the image ``source`` (its
    header); and how many feature values were left out (not finite, or of an unknown filter).

    Raises:
        NoDicom: a region whose mask cannot be read again.
        ValueError, TypeError, AttributeError, KeyError: a source highdicom cannot take.
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes

    from cxrtool.reports._roi import planar_group

    sop_uid = instance_uid(str(source.SOPInstanceUID), model, rows, version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", "radiomics"), name="cxrtool radiomics", manufacturer_name=MANUFACTURER,
            model_name="PyRadiomics"))
    segs: dict[str, Any] = {}
    groups, left_out, local = [], 0, False
    for row in rows:
        settings = (row.get("_provenance") or {}).get("settings", {}).get("radiomics", "")
        algorithm = hd.sr.AlgorithmIdentification(
            name="PyRadiomics", version=pyradiomics,
            parameters=[f"cxrtool {version}"] + ([f"settings {settings}"] if settings else []))
        where, finding, name = _region(row, source, segs)
        local = local or (finding is not None and finding.scheme_designator == LOCAL_SCHEME)
        measurements = []
        for column, value in features_of(row):
            number = _finite(value)
            measurement = _measurement(column, number) if number is not None else None
            if measurement is None:
                left_out += 1
                continue
            measurements.append(measurement)
        groups.append(planar_group(source, identifier=name, uid=derived_uid("radiomics region", sop_uid, row["mask"] or "",
                                                                             str(row.get("label"))),
                                   finding=finding, algorithm=algorithm,
                                   measurements=measurements, **where))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.cid100.XRUnspecifiedBodyRegion,
        imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    schemes = [CodingSchemeIdentificationItem(designator=IBSI_SCHEME, name=IBSI_SCHEME_NAME,
                                              responsible_organization="IBSI"),
               CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
                                              responsible_organization="PyRadiomics")]
    if local:
        from cxrtool.reports._dicom import coding_schemes

        schemes.extend(coding_schemes(True) or [])
    made = created(_Made(rows))
    with source_names_as_they_are():
        document = hd.sr.ComprehensiveSR(
            evidence=[evidence(source), *(evidence(seg) for seg in segs.values())],
            content=report,
            series_instance_uid=derived_uid("radiomics series", str(source.StudyInstanceUID), model),
            series_number=SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True, series_description=SERIES_DESCRIPTION,
            software_versions=version, content_date=made.date(), content_time=made.time().replace(microsecond=0),
            specific_character_set="ISO_IR 192", coding_schemes=schemes)
    return document, left_out


@dataclass
class _Made:
    """When the rows were measured (the latest), as :func:`created` reads a result."""

    rows: Sequence[Mapping[str, Any]]

    @property
    def created(self) -> str | None:
        return max((str(row["_measured"]) for row in self.rows if row.get("_measured")), default=None)


@dataclass
class ReportSummary:
    """What ``radiomics --dicom sr`` did: SRs written, already there, removed as stale;
    regions of images with no DICOM study; images that got none, and why."""

    written: list[Path] = field(default_factory=list)
    current: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    not_dicom: int = 0
    left_out: int = 0  # feature values not in the SRs (not finite, or of an unknown filter)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [*self.written, *self.current]


def write_reports(rows: Sequence[Mapping[str, Any]], *, progress: Callable[[int, int], None] | None = None
                  ) -> ReportSummary:
    """The SRs of a radiomics table's rows (see the module): written, kept, or removed.

    Raises:
        UsageError: highdicom is missing or too old.
    """
    from cxrtool import __version__
    from cxrtool.errors import OutputError
    from cxrtool.io.outputs import check_writable
    from cxrtool.io.study import StudyReadError, one_line, sniff_format
    from cxrtool.radiomics.batch import pyradiomics_version

    require_highdicom("the DICOM SR (--dicom sr)")
    pyradiomics = pyradiomics_version()
    summary = ReportSummary()
    groups: dict[tuple[str, str, Path], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["image"]), str(row.get("model") or ""), report_folder(row)), []).append(row)
    for done, ((image, model, folder), members) in enumerate(groups.items(), start=1):
        path = folder / report_name(image, model)
        measured = [row for row in members if row.get("status") == "ok"]
        try:
            kind = sniff_format(Path(image))
        except StudyReadError:
            kind = "unknown"
        if kind in ("png", "jpeg"):
            summary.not_dicom += len(measured)
            continue
        if not measured:
            if path.is_file() and not path.is_symlink():
                path.unlink()  # its rows are gone: the SR would say what the table no longer does
                summary.removed.append(path)
            continue
        try:
            source = source_header(Path(image), {}, WHAT)
            uid = instance_uid(str(source.SOPInstanceUID), model, measured, __version__)
            if is_current(path, uid):
                summary.current.append(path)
                continue
            check_writable(folder)
            document, left_out = build_report(source, model, measured, version=__version__, pyradiomics=pyradiomics)
        except NoDicom as why:
            summary.problems.append((image, f"no {WHAT}: {why}"))
            continue
        except OutputError as why:  # (a read-only folder beside a whole image: that image's SR only)
            summary.problems.append((image, f"no {WHAT}: {why}"))
            continue
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            summary.problems.append((image, f"no {WHAT}: highdicom cannot make one of it: "
                                            f"{one_line(str(error)) or type(error).__name__}"))
            continue
        write_dicom(document, path)
        summary.written.append(path)
        summary.left_out += left_out
        if progress is not None:
            progress(done, len(groups))
    return summary


__all__ = ["FILE_KIND", "IBSI_SCHEME", "PRIVATE_SCHEME", "ReportSummary", "build_report", "feature_code",
           "ibsi_codes", "instance_uid", "modifiers", "private_code", "report_name", "write_reports"]
