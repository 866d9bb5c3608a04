"""The label CSV layouts: telling them apart by their header (:func:`detect_format`) and the
per-format parsers (NIH, CheXpert/MIMIC-CXR-JPG, PadChest, generic) that
:func:`cxrtool.data.labels.read_labels` calls.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from cxrtool.data.labels._csv import (
    _GENERIC_PATH_COLUMNS,
    _GENERIC_PATIENT_COLUMNS,
    _GENERIC_VIEW_COLUMNS,
    _basename,
    _describe_header,
    _normalize_view,
)
from cxrtool.registry import CHEXPERT_FINDINGS, NIH_FINDINGS, finding_key, resolve_finding

# MIMIC-CXR / CheXpert identifier columns that are never observations.
_MIMIC_ID_COLUMNS = ("dicom_id", "subject_id", "study_id")

_CHEXPERT_PATIENT_RE = re.compile(r"(patient\d+)")
_MIMIC_PATIENT_RE = re.compile(r"(?:^|/)p(\d{6,})/s\d+")


def detect_format(header: Sequence[str]) -> str:
    """Name the label CSV layout of ``header``: "nih", "chexpert", "padchest" or "generic".

    Raises:
        ValueError: the header matches none of them (the message lists what was expected).

    Example:
        >>> detect_format(["Image Index", "Finding Labels", "Patient ID"])
        'nih'
    """
    columns = {h.strip() for h in header}
    lower = {h.lower() for h in columns}
    if {"Image Index", "Finding Labels"} <= columns:
        return "nih"
    if {"ImageID", "Labels"} <= columns:
        return "padchest"
    observations = columns & set(CHEXPERT_FINDINGS)
    if "Path" in columns and observations:
        return "chexpert"
    if observations and (columns & set(_MIMIC_ID_COLUMNS)):
        raise ValueError(
            "this looks like a MIMIC-CXR-JPG label CSV without image paths: add a 'Path' "
            "column (e.g. files/p10/p10000032/s50414267/<dicom_id>.jpg) and read it again"
        )
    if lower & set(_GENERIC_PATH_COLUMNS):
        return "generic"
    raise ValueError(
        f"unrecognised label CSV header ({_describe_header(list(header))}); expected NIH "
        "('Image Index' + 'Finding Labels'), CheXpert/MIMIC-CXR-JPG ('Path' + observation "
        "columns such as 'Cardiomegaly'), PadChest ('ImageID' + 'Labels') or generic ('path' + 0/1 finding columns)"
    )


def _row_values(row, names, cols, value_map, describe) -> list[float]:
    """One CSV row's label cells as numbers; ``describe(name, column, cell)`` words the error."""
    values = []
    for name, column in zip(names, cols, strict=True):
        cell = row[column].strip() if column < len(row) else ""
        value = value_map.get(cell)
        if value is None:
            raise ValueError(describe(name, column, cell))
        values.append(value)
    return values


_Parsed = tuple[tuple[str, ...], list[str], list[str], list[str], np.ndarray]


def _require(header: Sequence[str], columns: Sequence[str], what: str, path: Path) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise ValueError(
            f"{path.name}: {what} format needs column(s) {', '.join(map(repr, missing))}; "
            f"header has {_describe_header(list(header))}"
        )


def _parse_nih(
    path: Path, header: list[str], reader: Iterator[list[str]], wanted: tuple[str, ...] | None
) -> _Parsed:
    _require(header, ["Image Index", "Finding Labels"], "NIH", path)
    names = tuple(resolve_finding(f) for f in wanted) if wanted is not None else NIH_FINDINGS
    unknown = [f for f in names if f not in NIH_FINDINGS]
    if unknown:
        raise ValueError(
            f"finding(s) {', '.join(map(repr, unknown))} are not NIH ChestX-ray14 labels; "
            f"known: {', '.join(NIH_FINDINGS)}"
        )
    col = {h: i for i, h in enumerate(header)}
    i_img, i_lab = col["Image Index"], col["Finding Labels"]
    i_pat, i_view = col.get("Patient ID"), col.get("View Position")
    position = {name: k for k, name in enumerate(names)}

    images: list[str] = []
    patients: list[str] = []
    views: list[str] = []
    hits_rows: list[int] = []
    hits_cols: list[int] = []
    for row in reader:
        if not row or not row[0].strip():
            continue
        image = row[i_img].strip()
        images.append(image)
        patients.append(row[i_pat].strip() if i_pat is not None else _stem(image))
        views.append(_normalize_view(row[i_view]) if i_view is not None else "UNKNOWN")
        # "No Finding" and labels outside `names` simply set nothing: all zeros.
        for label in row[i_lab].split("|"):
            k = position.get(resolve_finding(label.strip()))
            if k is not None:
                hits_rows.append(len(images) - 1)
                hits_cols.append(k)
    targets = np.zeros((len(images), len(names)), dtype=np.float32)
    targets[hits_rows, hits_cols] = 1.0
    return tuple(names), images, patients, views, targets


def _stem(image: str) -> str:
    name = _basename(image)
    return name.rsplit(".", 1)[0] if "." in name else name


def _parse_chexpert(
    path: Path,
    header: list[str],
    reader: Iterator[list[str]],
    wanted: tuple[str, ...] | None,
    uncertain: str,
) -> _Parsed:
    _require(header, ["Path"], "CheXpert", path)
    col = {h: i for i, h in enumerate(header)}
    if wanted is not None:
        by_name = {resolve_finding(h): h for h in header}
        missing = [f for f in wanted if resolve_finding(f) not in by_name]
        if missing:
            raise ValueError(
                f"{path.name}: finding column(s) {', '.join(map(repr, missing))} not in the "
                f"header ({_describe_header(header)})"
            )
        names = tuple(by_name[resolve_finding(f)] for f in wanted)
    else:
        names = tuple(f for f in CHEXPERT_FINDINGS if f in col)
        if not names:
            raise ValueError(
                f"{path.name}: no CheXpert observation columns (e.g. 'Cardiomegaly') in the "
                f"header ({_describe_header(header)})"
            )
    uncertain_value = {"ignore": math.nan, "positive": 1.0, "negative": 0.0}[uncertain]
    # Blank = "not mentioned in the report" = negative, the usual CheXpert convention.
    value_map = {"": 0.0, "1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": uncertain_value,
                 "-1.0": uncertain_value}
    i_path = col["Path"]
    i_subject = col.get("subject_id")
    i_lateral = col.get("Frontal/Lateral")
    i_appa = col.get("AP/PA", col.get("ViewPosition"))
    cols = [col[f] for f in names]

    images: list[str] = []
    patients: list[str] = []
    views: list[str] = []
    rows: list[list[float]] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        image = row[i_path].strip()
        rows.append(
            _row_values(row, names, cols, value_map,
                        lambda name, c, cell, line_no=line_no: f"{path.name} line {line_no}: {name!r} has {cell!r}; "
                        "CheXpert labels must be 1.0, 0.0, -1.0 or blank")
        )
        images.append(image)
        patients.append(_chexpert_patient(image, row[i_subject] if i_subject is not None else ""))
        if i_lateral is not None and row[i_lateral].strip().lower() == "lateral":
            views.append("LATERAL")
        elif i_appa is not None:
            views.append(_normalize_view(row[i_appa]))
        else:
            views.append("UNKNOWN")
    targets = np.asarray(rows, dtype=np.float32).reshape(len(images), len(names))
    return tuple(names), images, patients, views, targets


# PadChest labels that say the study cannot be labelled: its row is left out of the losses.
_PADCHEST_UNUSABLE = {"exclude", "suboptimal study"}

def _padchest_labels(cell: str) -> list[str]:
    """PadChest's Labels cell, a Python-style list (``['pleural effusion', 'nodule']``), or a
    plain comma- or |-separated list."""
    import ast

    text = cell.strip()
    if text.startswith("["):
        try:
            values = ast.literal_eval(text)  # literals only: never evaluates code
        except (ValueError, SyntaxError):
            values = text.strip("[]").split(",")
    else:
        values = text.replace("|", ",").split(",")
    return [str(v) for v in values if str(v).strip()]


def _parse_padchest(
    path: Path, header: list[str], reader: Iterator[list[str]], wanted: tuple[str, ...] | None
) -> _Parsed:
    _require(header, ["ImageID", "Labels"], "PadChest", path)
    col = {h: i for i, h in enumerate(header)}
    i_img, i_lab = col["ImageID"], col["Labels"]
    i_pat, i_view = col.get("PatientID"), col.get("Projection")
    images: list[str] = []
    patients: list[str] = []
    views: list[str] = []
    rows: list[set[str] | None] = []
    spelled: dict[str, str] = {}  # a label's key -> its first spelling in the file
    for row in reader:
        if not row or len(row) <= max(i_img, i_lab) or not row[i_img].strip():
            continue
        image = row[i_img].strip()
        written = _padchest_labels(row[i_lab])
        for label in written:
            spelled.setdefault(finding_key(label), " ".join(label.strip().strip("'\"").split()))
        labels = {finding_key(label) for label in written}
        images.append(image)
        patients.append(row[i_pat].strip() if i_pat is not None and i_pat < len(row) else _stem(image))
        views.append(_normalize_view(row[i_view]) if i_view is not None and i_view < len(row) else "UNKNOWN")
        rows.append(None if not labels or labels & _PADCHEST_UNUSABLE else labels)
    if wanted is not None:
        names = tuple(wanted)
    else:  # every label the file uses, the commonest first
        counts: dict[str, int] = {}
        for labels in rows:
            for label in labels or ():
                counts[label] = counts.get(label, 0) + 1
        names = tuple(spelled[key] for key in sorted(counts, key=lambda label: (-counts[label], label)))
        if not names:
            raise ValueError(f"{path.name}: no labels in the 'Labels' column")
    keys = [finding_key(name) for name in names]
    if len(set(keys)) != len(keys):
        raise ValueError(f"findings name one label twice: {list(names)}")
    targets = np.full((len(images), len(names)), np.nan, dtype=np.float32)
    for i, labels in enumerate(rows):
        if labels is not None:
            targets[i] = [1.0 if key in labels else 0.0 for key in keys]
    return names, images, patients, views, targets


def _chexpert_patient(image: str, subject: str) -> str:
    if subject.strip():
        return subject.strip()
    normalized = image.replace("\\", "/")
    match = _CHEXPERT_PATIENT_RE.search(normalized)
    if match:
        return match.group(1)
    match = _MIMIC_PATIENT_RE.search(normalized)  # MIMIC-CXR-JPG: files/p10/p10000032/s.../
    if match:
        return match.group(1)
    return _stem(image)


def _parse_generic(
    path: Path, header: list[str], reader: Iterator[list[str]], wanted: tuple[str, ...] | None
) -> _Parsed:
    lower = [h.lower() for h in header]
    i_path = next((lower.index(c) for c in _GENERIC_PATH_COLUMNS if c in lower), None)
    if i_path is None:
        raise ValueError(
            f"{path.name}: generic format needs a 'path' column; header has "
            f"{_describe_header(header)}"
        )
    i_patient = next((lower.index(c) for c in _GENERIC_PATIENT_COLUMNS if c in lower), None)
    i_view = next((lower.index(c) for c in _GENERIC_VIEW_COLUMNS if c in lower), None)
    id_columns = {i_path, i_patient, i_view}
    if wanted is not None:
        by_name = {resolve_finding(h): i for i, h in enumerate(header) if i not in id_columns}
        missing = [f for f in wanted if resolve_finding(f) not in by_name]
        if missing:
            raise ValueError(
                f"{path.name}: finding column(s) {', '.join(map(repr, missing))} not in the "
                f"header ({_describe_header(header)})"
            )
        cols = [by_name[resolve_finding(f)] for f in wanted]
        names = tuple(header[i] for i in cols)
    else:
        cols = [i for i, h in enumerate(header) if i not in id_columns and h]
        names = tuple(header[i] for i in cols)
        if not cols:
            raise ValueError(f"{path.name}: generic CSV has a path column but no finding columns")
        if len({resolve_finding(name) for name in names}) != len(names):
            raise ValueError(f"{path.name}: duplicate finding columns in {list(names)}")
    # Blank in our own format = unknown (NaN), not negative: nothing says otherwise.
    value_map = {"": math.nan, "0": 0.0, "1": 1.0, "0.0": 0.0, "1.0": 1.0}

    images: list[str] = []
    patients: list[str] = []
    views: list[str] = []
    rows: list[list[float]] = []
    for line_no, row in enumerate(reader, start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        image = row[i_path].strip()
        if not image:
            raise ValueError(f"{path.name} line {line_no}: empty path")
        rows.append(
            _row_values(row, names, cols, value_map,
                        lambda name, c, cell, line_no=line_no: f"{path.name} line {line_no}: column {header[c]!r} has {cell!r}; "
                        "generic label columns must be 0, 1 or blank (pass findings=[...] to pick columns)")
        )
        images.append(image)
        patient = row[i_patient].strip() if i_patient is not None and i_patient < len(row) else ""
        patients.append(patient or _stem(image))
        views.append(
            _normalize_view(row[i_view]) if i_view is not None and i_view < len(row) else "UNKNOWN"
        )
    targets = np.asarray(rows, dtype=np.float32).reshape(len(images), len(names))
    return tuple(names), images, patients, views, targets

