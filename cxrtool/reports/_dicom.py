"""What the DICOM output stages share (:mod:`cxrtool.reports.sr`, :mod:`cxrtool.reports.seg`):
the findings' codes, the source's header and the part of it an object of the same study
takes, derived UIDs, and writing.

Nothing here imports highdicom or pydicom at import time: a stage's module loads only its
own names, and its dependencies when a run makes it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from cxrtool.io.outputs import atomic_path
from cxrtool.io.records import Result
from cxrtool.registry import FINDING_ALIASES

MANUFACTURER = "cxrtool"

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
# 64 characters). An object that uses it names the scheme in its Coding Scheme
# Identification Sequence (:func:`coding_schemes`).
LOCAL_SCHEME = "99CXRTOOL"
LOCAL_SCHEME_NAME = "cxrtool finding names (the model card's spelling)"

# Of the UIDs derived here (:func:`derived_uid`). The name is the SR module's, where they
# were first derived: the same parts keep giving the same UIDs.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "cxrtool.reports.sr")


class NoDicom(Exception):
    """Why a study gets no DICOM object of a stage (one line, said in its record)."""


def finding_code(name: str) -> tuple[str, str, str]:
    """The code of a finding: (value, scheme designator, meaning): from :data:`FINDING_CODES`,
    else the finding's own name in :data:`LOCAL_SCHEME`."""
    key = FINDING_ALIASES.get(name, name).replace("_", " ").strip().lower()
    if key in FINDING_CODES:
        return FINDING_CODES[key]
    text = " ".join(name.replace("\\", "/").split()) or "unnamed"
    return text, LOCAL_SCHEME, text[:64]


def coding_schemes(local: bool) -> list[Any] | None:
    """The Coding Scheme Identification Sequence's items of an object that uses
    :data:`LOCAL_SCHEME` (``local``), else None."""
    if not local:
        return None
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return [CodingSchemeIdentificationItem(designator=LOCAL_SCHEME, name=LOCAL_SCHEME_NAME,
                                           responsible_organization=MANUFACTURER)]


def derived_uid(*parts: str) -> str:
    """A UID derived from ``parts``: ``2.25.`` and a name-based (SHA-1, version 5) UUID as an
    integer (PS3.5 B.2); the same parts always give the same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, chr(31).join(parts)).int}"


def require_highdicom(what: str) -> None:
    """Refuse a run whose DICOM output cannot be made here (``what``: "the DICOM SR (--dicom sr)").

    Raises:
        UsageError: highdicom is missing, or too old.
    """
    from cxrtool.errors import UsageError

    try:
        import highdicom
    except ImportError:
        raise UsageError(f'{what} needs highdicom: pip install "cxrtool[dicom]"') from None
    try:
        patient_and_study_keywords()
    except (ImportError, KeyError):
        raise UsageError(f"{what} needs a newer highdicom than {highdicom.__version__} "
                         "(0.28 is known to work): pip install -U highdicom") from None


@functools.lru_cache(maxsize=1)
def patient_and_study_keywords() -> frozenset[str]:
    """The root attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1),
    as highdicom's tables of the standard list them (the tables its own copying uses)."""
    from highdicom._standard_utils import get_module_attribute_map

    modules = get_module_attribute_map()
    return frozenset(entry["keyword"] for module in ("patient", "general-study") for entry in modules[module]
                     if not entry["path"])


# What highdicom reads from the source (Type 2 in the SR and SEG IODs: present, if empty).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")
REFERENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def evidence(source: Any) -> Any:
    """The part of the source's header an object of its study may take: the UIDs that
    reference it, and its Patient and General Study module attributes (the Type 2 ones it
    lacks, empty); nothing else (no Patient Study module, equipment, institution)."""
    from pydicom import Dataset

    kept = Dataset()
    for keyword in REFERENCE:
        kept.add(source[keyword])
    for keyword in sorted(patient_and_study_keywords()):
        if keyword in source:
            kept.add(source[keyword])
    for keyword in _TYPE2:
        if keyword not in kept:
            setattr(kept, keyword, None)
    return kept


@contextlib.contextmanager
def source_names_as_they_are() -> Iterator[None]:
    """highdicom warns of a patient's name it thinks malformed; it is the source's, as the
    source has it: not ours to judge."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name", category=UserWarning)
        yield


def created(result: Result) -> _dt.datetime:
    """When the result was made, in this machine's local time (DICOM's dates carry no zone)."""
    try:
        return _dt.datetime.fromisoformat(result.created).astimezone().replace(tzinfo=None)
    except (TypeError, ValueError):
        return _dt.datetime.now()


def read_header(path: Path) -> Any:
    """The header of a DICOM file (no pixels).

    Raises:
        NoDicom: it cannot be read as DICOM.
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
        raise NoDicom(f"the file cannot be read again: {error}") from None
    except Exception as error:  # noqa: BLE001 - any failure of pydicom's on a header: said, the run goes on
        raise NoDicom(f"its DICOM header cannot be read: {one_line(str(error)) or type(error).__name__}") from None


def source_header(path: Path, identity: Mapping[str, str], what: str) -> Any:
    """The header of the DICOM image a result was made from (``what``: the object it is
    for, as the reasons name it: "DICOM SR").

    Raises:
        NoDicom: a PNG or JPEG (no DICOM study), a file without the UIDs to reference, or one
            that is no longer the image the result was made from.
    """
    kind = identity.get("format")
    if kind in ("png", "jpeg"):
        raise NoDicom(f"a {kind.upper()} file has no DICOM study to add a {what} to")
    source = read_header(path)
    missing = [keyword for keyword in REFERENCE if not str(source.get(keyword, "") or "").strip()]
    if missing:
        raise NoDicom(f"the DICOM file has no {', '.join(missing)} to reference")
    expected = identity.get("sop_instance_uid")
    if expected and str(source.SOPInstanceUID) != expected:
        raise NoDicom("the file is no longer the image the result was made from (another SOP Instance UID)")
    return source


def is_current(path: Path, uid: str) -> bool:
    """Whether the DICOM file at ``path`` is the instance ``uid`` (its SOP Instance UID)."""
    import pydicom

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
    except Exception:  # noqa: BLE001 - unreadable, a link, gone: not current, written again
        return False
    return not path.is_symlink() and str(header.get("SOPInstanceUID", "")) == uid


def write_dicom(document: Any, path: Path) -> Path:
    """Write a DICOM object atomically (never through a link), as a DICOM file (preamble, meta).

    Raises:
        OutputError: the place cannot take it.
    """
    with atomic_path(path) as tmp:
        document.save_as(tmp, enforce_file_format=True)
    return path


class DicomObjectStage:
    """What the DICOM output stages share (``sr``, ``seg``): for each study with a result, its
    DICOM source's header, the object's name and SOP Instance UID, "already done" (a skipped
    study whose result lists the object and whose file is still that instance), building
    (a reason in the study's record, one line, when it cannot be made), writing and
    listing it in the result. A stage says what it is (``name``, ``file_kind``, ``what``)
    and supplies :meth:`instance_uid` and :meth:`build` (and :meth:`nothing_to_write`)."""

    name = ""  # the stage's name: --dicom NAME, result.outputs[NAME]
    file_kind = ""  # NAME.cxrtool.<model id>.<file_kind>
    what = ""  # as the study's record names it: "no DICOM SR: ..."

    def __init__(self, context: Any) -> None:
        require_highdicom(f"the {self.what} (--dicom {self.name})")
        self.version = str(context.version)

    def instance_uid(self, source_uid: str, result: Result) -> str:
        raise NotImplementedError

    def nothing_to_write(self, result: Result) -> str | None:
        """Why a study with a DICOM source gets no object (one line), or None."""
        return None

    def build(self, outcome: Any, source: Any, result: Result) -> Any:
        """The object (a highdicom dataset) of the study's result on its source.

        Raises:
            NoDicom: a reason it cannot be made, said in the study's record.
            ValueError, TypeError, AttributeError, KeyError: a source highdicom cannot take.
        """
        raise NotImplementedError

    def study(self, outcome: Any) -> None:
        result = outcome.result
        if outcome.status == "failed" or result is None:
            return
        from cxrtool.io.study import one_line

        record = outcome.record or outcome.sidecar
        try:
            source = source_header(outcome.path, record.identity if record is not None else {}, self.what)
        except NoDicom as why:
            outcome.notes.append(f"no {self.what}: {why}")
            return
        why_none = self.nothing_to_write(result)
        if why_none is not None:
            outcome.notes.append(f"no {self.what}: {why_none}")
            return
        name = outcome.output_name(self.file_kind)
        path = outcome.folder / name
        uid = self.instance_uid(str(source.SOPInstanceUID), result)
        if outcome.status == "skipped" and result.outputs.get(self.name) == [name] and is_current(path, uid):
            return  # done before, and still there
        try:
            document = self.build(outcome, source, result)
        except NoDicom as why:
            outcome.notes.append(f"no {self.what}: {why}")
            return
        except (ValueError, TypeError, AttributeError, KeyError) as error:
            outcome.notes.append(f"no {self.what}: highdicom cannot make one of this file: "
                                 f"{one_line(str(error)) or type(error).__name__}")
            return
        write_dicom(document, path)
        outcome.wrote(self.name, [name])

    def finish(self) -> list[Path]:
        return []


__all__ = ["FINDING_CODES", "DicomObjectStage", "LOCAL_SCHEME", "LOCAL_SCHEME_NAME", "MANUFACTURER", "REFERENCE",
           "NoDicom", "coding_schemes", "created", "derived_uid", "evidence", "finding_code", "is_current",
           "patient_and_study_keywords", "read_header", "require_highdicom", "source_header",
           "source_names_as_they_are", "write_dicom"]
