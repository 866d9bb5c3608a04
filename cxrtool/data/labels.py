"""One in-memory label table for every dataset that training and evaluation read.

Three CSV layouts are understood, told apart by their header:

* **NIH ChestX-ray14** (``Data_Entry_2017*.csv``): ``Image Index`` + ``Finding Labels``
  (``|``-separated, ``No Finding`` for none), ``Patient ID``, ``View Position``.
* **CheXpert / MIMIC-CXR-JPG**: a ``Path`` column plus observation columns
  (``Cardiomegaly``, ``Pleural Effusion``...) holding ``1.0``, ``0.0``, ``-1.0`` (uncertain)
  or blank (not mentioned).
* **generic**: a ``path`` column plus one 0/1 column per finding; optional ``patient_id``
  (or ``patient``) and ``view`` columns.

Targets are float32 with 1, 0 or NaN; NaN means "unknown: no loss, no metric".
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from cxrtool.registry import (
    CHEXPERT_FINDINGS,
    LABEL_SETS,
    NIH_FINDINGS,
    PROJECTIONS,
    VIEW_POSITIONS,
    finding_key,
    resolve_finding,
)
from cxrtool.registry import LABEL_FORMATS as _FORMATS
from cxrtool.registry import UNCERTAIN_POLICIES as _POLICIES

__all__ = [
    "Box",
    "LabelTable",
    "VIEW_POSITIONS",
    "UNCERTAIN_POLICIES",
    "LABEL_FORMATS",
    "patient_split",
    "read_boxes",
    "read_labels",
    "read_views",
    "ViewTable",
]

UNCERTAIN_POLICIES = tuple(_POLICIES)
LABEL_FORMATS = _FORMATS

# Generic-CSV columns that describe the row rather than name a finding.
_GENERIC_PATH_COLUMNS = ("path", "file", "image", "filename")
_GENERIC_PATIENT_COLUMNS = ("patient_id", "patient")
_GENERIC_VIEW_COLUMNS = ("view", "view_position")
# MIMIC-CXR / CheXpert identifier columns that are never observations.
_MIMIC_ID_COLUMNS = ("dicom_id", "subject_id", "study_id")

_CHEXPERT_PATIENT_RE = re.compile(r"(patient\d+)")
_MIMIC_PATIENT_RE = re.compile(r"(?:^|/)p(\d{6,})/s\d+")


@dataclass
class LabelTable:
    """Rows of (image, patient, view, targets) in one dataset-independent form.

    Attributes:
        findings: finding names, one per target column.
        images: image path per row, as written in the CSV (relative to an image root, or
            absolute).
        patients: patient id per row (the image's stem when the CSV has no patient column).
        views: "PA", "AP", "LATERAL" or "UNKNOWN" per row.
        targets: float32 array (N, F) of 1, 0 or NaN (NaN = ignore in losses and metrics).
        source: "nih", "chexpert" or "generic".
        skipped: rows dropped because their image file was missing.
        image_root: the folder relative image paths are resolved against.
        row_roots: per-row roots, only when rows were found under different folders.
    """

    findings: tuple[str, ...]
    images: list[str]
    patients: list[str]
    views: list[str]
    targets: np.ndarray
    source: str
    skipped: int = 0
    image_root: Path | None = None
    row_roots: list[Path] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.findings = tuple(self.findings)
        self.targets = np.asarray(self.targets, dtype=np.float32).reshape(
            len(self.images), len(self.findings)
        )
        n = len(self.images)
        if len(self.patients) != n or len(self.views) != n:
            raise ValueError(
                f"LabelTable columns differ in length: {n} images, {len(self.patients)} "
                f"patients, {len(self.views)} views"
            )
        if self.row_roots is not None and len(self.row_roots) != n:
            raise ValueError(f"row_roots has {len(self.row_roots)} entries for {n} rows")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> LabelTable:
        """Return a new table holding only ``indices`` (in that order).

        Example:
            >>> train_idx, val_idx = patient_split(table)
            >>> val = table.subset(val_idx)
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        pick = idx.tolist()
        return LabelTable(
            findings=self.findings,
            images=[self.images[i] for i in pick],
            patients=[self.patients[i] for i in pick],
            views=[self.views[i] for i in pick],
            targets=self.targets[idx].copy(),
            source=self.source,
            skipped=self.skipped,
            image_root=self.image_root,
            row_roots=None if self.row_roots is None else [self.row_roots[i] for i in pick],
        )

    def projections(self) -> LabelTable:
        """The projections of the rows as the targets of a view classifier: one column per
        projection the table has (of PA, AP, LATERAL), one-hot; rows of unknown projection
        are left out.

        Raises:
            ValueError: fewer than two projections among the rows.
        """
        known = [i for i, view in enumerate(self.views) if view in PROJECTIONS]
        classes = [view for view in PROJECTIONS if any(self.views[i] == view for i in known)]
        if len(classes) < 2:
            raise ValueError(f"a view classifier needs at least two projections in the labels' view column; "
                             f"these have {', '.join(classes) or 'none'} ({len(self) - len(known)} of {len(self)} "
                             "rows of unknown projection)")
        table = self.subset(known)
        table.findings = tuple(classes)
        table.targets = np.array([[float(view == c) for c in classes] for view in table.views], dtype=np.float32)
        table.targets = table.targets.reshape(len(known), len(classes))
        return table

    def of_projections(self, projections: Sequence[str]) -> LabelTable:
        """The rows whose view column is one of ``projections`` (PA, AP, LATERAL, UNKNOWN):
        the data of a model trained for those projections.

        Raises:
            ValueError: an unknown projection, or no row of these projections.
        """
        unknown = [p for p in projections if p not in VIEW_POSITIONS]
        if unknown:
            raise ValueError(f"unknown projection {unknown[0]!r}; choose from {', '.join(VIEW_POSITIONS)}")
        wanted = set(projections)
        rows = [i for i, view in enumerate(self.views) if view in wanted]
        if not rows:
            counts = ", ".join(f"{self.views.count(v)} {v}" for v in VIEW_POSITIONS if v in self.views)
            raise ValueError(f"no row of projection {', '.join(projections)} in the labels' view column ({counts})")
        return self.subset(rows)

    def key_for(self, i: int) -> str:
        """The file name used to join predictions with row ``i`` (basename of its path).

        Example:
            >>> table.key_for(0)
            '00000129_000.png'
        """
        return _basename(self.images[i])

    def resolve_image(self, i: int) -> Path:
        """The path to open for row ``i``: absolute paths as-is, relative ones under the root.

        Example:
            >>> table.resolve_image(0)
            PosixPath('/data/nih/images/00000129_000.png')
        """
        path = Path(self.images[i])
        if path.is_absolute():
            return path
        if self.row_roots is not None:
            return self.row_roots[i] / path
        return (self.image_root or Path(".")) / path

    def positives(self) -> dict[str, int]:
        """Count of positive (== 1) labels per finding.

        Example:
            >>> table.positives()["Cardiomegaly"]
            12
        """
        counts = np.sum(self.targets == 1, axis=0)
        return {name: int(c) for name, c in zip(self.findings, counts, strict=True)}


@dataclass
class Box:
    """One radiologist bounding box, in pixels of the original image (x, y = top left)."""

    image: str
    finding: str
    x: float
    y: float
    w: float
    h: float


# --------------------------------------------------------------------------- reading


def _open_text(path: Path) -> io.TextIOBase:
    """Open a CSV as text, transparently gunzipping (by content, not by extension)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")  # type: ignore[return-value]
    return open(path, encoding="utf-8-sig", newline="")


def _read_csv(path: Path) -> tuple[list[str], Iterator[list[str]], io.TextIOBase]:
    fh = _open_text(path)
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        fh.close()
        raise ValueError(f"{path}: empty file, expected a CSV header") from None
    header = [h.strip() for h in header]
    return header, reader, fh


def _basename(image: str) -> str:
    # CSVs written on Windows may use backslashes; either separator ends a folder name.
    return PurePosixPath(image.replace("\\", "/")).name




def _normalize_view(value: str) -> str:
    token = value.strip().upper()
    if not token:
        return "UNKNOWN"
    first = token.split()[0]
    if first in ("PA", "AP"):
        return first
    if first in ("AP_HORIZONTAL", "AP_SUPINE"):  # PadChest's supine AP films
        return "AP"
    if first in ("LATERAL", "LAT", "LL", "RL", "L", "LEFT_LATERAL", "RIGHT_LATERAL"):
        return "LATERAL"
    return "UNKNOWN"


def _describe_header(header: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(repr(h) for h in header[:limit])
    return shown + (f", ... ({len(header)} columns)" if len(header) > limit else "")


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


class _Locator:
    """Answers "does this image exist, and under which root?" from directory listings.

    Listing each folder once (os.listdir into a set) is what keeps 112,120 NIH rows fast:
    one stat per row would cost seconds on network file systems.
    """

    def __init__(self, roots: Sequence[Path]) -> None:
        self.roots = [Path(r) for r in roots]
        self._listings: dict[str, frozenset[str]] = {}

    def _names(self, folder: str) -> frozenset[str]:
        names = self._listings.get(folder)
        if names is None:
            try:
                names = frozenset(os.listdir(folder))
            except OSError:  # missing folder or not a folder: nothing exists there
                names = frozenset()
            self._listings[folder] = names
        return names

    def find(self, image: str) -> int:
        """Index of the first root holding ``image``; -1 when missing; -2 for absolute hits."""
        normalized = image.replace("\\", "/")
        parent, _, name = normalized.rpartition("/")
        if os.path.isabs(normalized):
            return -2 if name in self._names(parent or "/") else -1
        for k, root in enumerate(self.roots):
            folder = os.path.join(str(root), parent) if parent else str(root)
            if name in self._names(folder):
                return k
        return -1


def read_labels(
    csv_path: str | os.PathLike[str],
    *,
    image_root: str | os.PathLike[str] | None = None,
    fmt: str = "auto",
    findings: Sequence[str] | None = None,
    uncertain: str = "ignore",
    require_images: bool = True,
) -> LabelTable:
    """Read an NIH, CheXpert/MIMIC-CXR-JPG or generic label CSV (``.csv`` or ``.csv.gz``).

    Args:
        csv_path: the label file.
        image_root: folder that relative image paths are resolved against. Default: the
            CSV's folder (NIH also tries ``<csv folder>/images``; CheXpert also tries the
            CSV's parent, since its paths start with the dataset folder's name).
        fmt: "auto" (detect from the header), "nih", "chexpert" or "generic".
        findings: finding columns to keep, in this order (e.g. ``PHANTOM_FINDINGS``).
            Default: NIH_FINDINGS for NIH, the CheXpert observations present for CheXpert,
            every non-id column for generic.
        uncertain: CheXpert ``-1`` policy: "ignore" (NaN), "positive" (1) or "negative" (0).
        require_images: drop rows whose image file does not exist, counting them in
            ``skipped``.

    Returns:
        The LabelTable.

    Raises:
        ValueError: unrecognised header, unknown finding, bad value (one-line reason).
        FileNotFoundError: ``csv_path`` does not exist.

    Example:
        >>> table = read_labels("../shared/data/nih/Data_Entry_2017_v2020.csv.gz")
        >>> len(table), table.skipped
        (388, 111732)
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    if fmt == "mimic":
        fmt = "chexpert"
    if fmt not in LABEL_FORMATS:
        raise ValueError(f"unknown label format {fmt!r}; choose one of {', '.join(LABEL_FORMATS)}")
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(
            f"unknown uncertain-label policy {uncertain!r}; choose one of "
            f"{', '.join(UNCERTAIN_POLICIES)}"
        )
    # Findings are asked for, and matched to columns, by name or alias (registry.FINDING_ALIASES);
    # the table names them as the file spells them.
    wanted = None if findings is None else tuple(findings)
    if wanted is not None and len(wanted) == 1 and wanted[0] in LABEL_SETS:
        wanted = tuple(LABEL_SETS[wanted[0]])  # a label set's name: its findings
    if wanted is not None:
        if not wanted:
            raise ValueError("findings is empty: name at least one finding")
        if len({resolve_finding(f) for f in wanted}) != len(wanted):
            raise ValueError(f"findings has duplicates: {list(wanted)}")

    header, reader, fh = _read_csv(path)
    with fh:
        kind = detect_format(header) if fmt == "auto" else fmt
        if kind == "nih":
            parsed = _parse_nih(path, header, reader, wanted)
        elif kind == "chexpert":
            parsed = _parse_chexpert(path, header, reader, wanted, uncertain)
        elif kind == "padchest":
            parsed = _parse_padchest(path, header, reader, wanted)
        else:
            parsed = _parse_generic(path, header, reader, wanted)
    names, images, patients, views, targets = parsed

    csv_dir = path.resolve().parent
    if image_root is not None:
        roots = [Path(image_root)]
    elif kind == "nih":
        roots = [csv_dir / "images", csv_dir]
    elif kind == "chexpert":
        roots = [csv_dir, csv_dir.parent]
    elif kind == "padchest":
        # PadChest ships its PNGs in numbered folders (0 ... 54); a flattened copy works too.
        numbered = sorted((p for p in csv_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        roots = [csv_dir, csv_dir / "images", *numbered]
    else:
        roots = [csv_dir]

    locator = _Locator(roots)
    where = np.fromiter((locator.find(im) for im in images), dtype=np.int64, count=len(images))
    found_roots = sorted(set(where[where >= 0].tolist()))
    default_root = roots[found_roots[0]] if found_roots else roots[0]
    if image_root is None and kind == "nih" and not found_roots and not (csv_dir / "images").is_dir():
        default_root = csv_dir

    skipped = 0
    if require_images:
        keep = np.flatnonzero(where != -1)
        skipped = len(images) - len(keep)
        if len(keep) != len(images):
            pick = keep.tolist()
            images = [images[i] for i in pick]
            patients = [patients[i] for i in pick]
            views = [views[i] for i in pick]
            targets = targets[keep]
            where = where[keep]

    row_roots = None
    if len(found_roots) > 1:  # rows live under different roots: remember each row's own
        row_roots = [roots[k] if k >= 0 else default_root for k in where.tolist()]

    return LabelTable(
        findings=names,
        images=images,
        patients=patients,
        views=views,
        targets=targets,
        source=kind,
        skipped=skipped,
        image_root=default_root,
        row_roots=row_roots,
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


# --------------------------------------------------------------------------- projections

# Columns that name a row's image, and columns that give its projection, in the tables of
# NIH (Image Index, View Position), CheXpert (Path, Frontal/Lateral, AP/PA), MIMIC-CXR's
# metadata (dicom_id, ViewPosition), PadChest (ImageID, Projection) and cxrtool's generic
# format (path, view).
_IMAGE_COLUMNS = ("image index", "path", "dicom_id", "imageid", *_GENERIC_PATH_COLUMNS)
_VIEW_COLUMNS = ("view position", "viewposition", "ap/pa", "projection", *_GENERIC_VIEW_COLUMNS)


class ViewTable:
    """Projections of images by their paths, as a table gives them: a study is matched to
    the row whose path is the longest suffix of the study's own path (a file name alone
    where that is unique: NIH, MIMIC's ``dicom_id``, matched by stem too), so in a
    CheXpert tree ``patient2/study1/view1_frontal.jpg`` never takes patient 1's
    projection. A suffix that rows of different projections share says nothing; rows of
    unknown projection count, so a name they share with a known row is not taken either.
    """

    def __init__(self) -> None:
        self._by_suffix: dict[tuple[str, ...], str | None] = {}
        self.rows = 0

    def add(self, image: str, view: str) -> None:
        parts = tuple(part for part in PurePosixPath(image.replace("\\", "/")).parts if part not in ("/", "."))
        if not parts:
            return
        self.rows += 1
        stem = PurePosixPath(parts[-1]).stem
        for k in range(1, len(parts) + 1):
            for key in {parts[-k:], (*parts[-k:-1], stem)}:
                known = self._by_suffix.get(key, view)
                self._by_suffix[key] = view if known == view else None

    def get(self, path: str | os.PathLike) -> str | None:
        """The projection of the study at ``path`` (PA, AP or LATERAL), or None when the
        table does not say or its rows disagree."""
        parts = Path(path).absolute().parts[1:]
        stem = Path(path).stem
        for k in range(len(parts), 0, -1):
            for key in (parts[-k:], (*parts[-k:-1], stem)):
                if key in self._by_suffix:
                    view = self._by_suffix[key]
                    return view if view in PROJECTIONS else None
        return None

    def __bool__(self) -> bool:
        return self.rows > 0

    def __len__(self) -> int:
        return self.rows


def _find_column(header: Sequence[str], names: Sequence[str]) -> int | None:
    """The index of the first of ``names`` (lower case) the header has, in any case; None if none."""
    lower = [h.strip().lower() for h in header]
    return next((lower.index(name) for name in names if name in lower), None)


def read_views(csv_path: str | os.PathLike[str]) -> ViewTable:
    """Each image's projection from a label or metadata table (:class:`ViewTable`: looked
    up by a study's path).

    Reads NIH ``Data_Entry`` files, CheXpert and MIMIC-CXR-JPG label files, MIMIC-CXR's
    metadata file (``dicom_id``: matched by the stem a DICOM or JPEG of it has), PadChest
    and generic tables with a path and a view column; a CheXpert ``Frontal/Lateral`` of
    Lateral wins over its ``AP/PA``.

    Raises:
        ValueError: no image or no view column in the header.
        FileNotFoundError: ``csv_path`` does not exist.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"view table not found: {path}")
    header, reader, fh = _read_csv(path)
    with fh:
        i_image, i_view = _find_column(header, _IMAGE_COLUMNS), _find_column(header, _VIEW_COLUMNS)
        i_lateral = _find_column(header, ("frontal/lateral",))
        if i_image is None or (i_view is None and i_lateral is None):
            raise ValueError(f"{path.name}: no image and view columns (e.g. 'Image Index' and 'View Position', or "
                             f"path and view) in the header ({_describe_header(header)})")
        table = ViewTable()
        for row in reader:
            if len(row) <= i_image or not row[i_image].strip():
                continue
            view = "UNKNOWN"
            if i_lateral is not None and i_lateral < len(row) and row[i_lateral].strip().lower() == "lateral":
                view = "LATERAL"
            elif i_view is not None and i_view < len(row):
                view = _normalize_view(row[i_view])
            table.add(row[i_image].strip(), view)
    return table


def read_unlabelled(source: str | os.PathLike[str]) -> tuple[list[str], int]:
    """Radiographs without labels (``train --unlabelled``): every study under a folder, or
    the images a CSV names in its image column (``path``, ``Image Index``, ...; relative to
    the CSV's folder). Returns the paths that exist and how many rows named a missing file.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: a CSV without an image column, or nothing to read.
    """
    from cxrtool.io.studies import find_studies

    path = Path(source)
    if path.is_dir():
        found = [str(p) for p in find_studies([path])]
        if not found:
            raise ValueError(f"unlabelled: no radiographs under {path}")
        return found, 0
    if not path.is_file():
        raise FileNotFoundError(f"unlabelled: no such folder or CSV: {path}")
    header, reader, fh = _read_csv(path)
    with fh:
        column = _find_column(header, _IMAGE_COLUMNS)
        if column is None:
            raise ValueError(f"unlabelled: {path.name} has no image column (e.g. path or 'Image Index') in its header "
                             f"({_describe_header(header)})")
        names = [row[column].strip() for row in reader if len(row) > column and row[column].strip()]
    resolved = [name if os.path.isabs(name) else str(path.parent / name) for name in names]
    existing = [name for name in resolved if os.path.isfile(name)]
    if not existing:
        raise ValueError(f"unlabelled: none of the {len(names)} images {path.name} names is on disk")
    return existing, len(resolved) - len(existing)


# --------------------------------------------------------------------------- splitting


def patient_split(
    table: LabelTable, *, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into train and validation by patient (no patient on both sides).

    Patients are shuffled with ``seed``; about ``val_fraction`` of them (at least one, and
    at least one left for training) go to validation. Before filling up in shuffled order,
    each finding with at least two positive patients gets one positive patient in
    validation (rarest findings first, while room remains and one positive patient stays
    in training), so every such finding can be scored on validation.

    Args:
        table: the labels.
        val_fraction: share of patients for validation, in (0, 1).
        seed: shuffling seed; the same seed gives the same split.

    Returns:
        (train_idx, val_idx): sorted int64 row indices into ``table``.

    Raises:
        ValueError: fewer than 2 patients, or val_fraction outside (0, 1).

    Example:
        >>> train_idx, val_idx = patient_split(table, val_fraction=0.2, seed=1)
        >>> train, val = table.subset(train_idx), table.subset(val_idx)
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    unique, inverse = np.unique(np.asarray(table.patients, dtype=object).astype(str),
                                return_inverse=True)
    n_patients = len(unique)
    if n_patients < 2:
        raise ValueError(f"a patient-level split needs at least 2 patients, got {n_patients}")
    n_val = min(max(1, int(round(val_fraction * n_patients))), n_patients - 1)

    rng = np.random.default_rng(seed)
    order = rng.permutation(n_patients)  # shuffled patient ids; np.unique made them sorted
    rank = np.empty(n_patients, dtype=np.int64)
    rank[order] = np.arange(n_patients)

    # positive[p, f]: patient p has at least one row positive for finding f.
    positive = np.zeros((n_patients, len(table.findings)), dtype=bool)
    if len(table):
        np.logical_or.at(positive, inverse, table.targets == 1)
    n_pos = positive.sum(axis=0)

    in_val = np.zeros(n_patients, dtype=bool)
    for f in np.argsort(n_pos, kind="stable"):  # rarest first: they have the fewest options
        if in_val.sum() >= n_val:
            break
        if n_pos[f] < 2 or (positive[:, f] & in_val).any():
            continue
        # None of f's >= 2 positive patients is in validation yet, so taking one still
        # leaves training at least one.
        candidates = np.flatnonzero(positive[:, f])
        in_val[candidates[np.argmin(rank[candidates])]] = True
    for p in order:
        if in_val.sum() >= n_val:
            break
        in_val[p] = True

    val_rows = in_val[inverse]
    return np.flatnonzero(~val_rows).astype(np.int64), np.flatnonzero(val_rows).astype(np.int64)


# --------------------------------------------------------------------------- boxes


def read_boxes(csv_path: str | os.PathLike[str]) -> list[Box]:
    """Read bounding boxes: NIH ``BBox_List_2017.csv(.gz)`` or generic ``file,finding,x,y,w,h``.

    Finding names go through :func:`~cxrtool.registry.resolve_finding`, so NIH's
    ``Infiltrate`` comes back as ``Infiltration``.

    Raises:
        ValueError: unrecognised header or a non-numeric coordinate.

    Example:
        >>> boxes = read_boxes("../shared/data/nih/BBox_List_2017.csv.gz")
        >>> len(boxes), boxes[0].finding
        (984, 'Atelectasis')
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"box file not found: {path}")
    header, reader, fh = _read_csv(path)
    lower = [h.lower() for h in header]
    if len(header) >= 3 and header[0] == "Image Index" and header[1] == "Finding Label":
        # NIH: the header names 3 columns but rows hold 6 (x, y, w, h spill into blanks).
        cols = [0, 1, 2, 3, 4, 5]
    else:
        image_col = next((c for c in ("file", "image", "path", "image index") if c in lower), None)
        finding_col = next((c for c in ("finding", "finding label", "label") if c in lower), None)
        if image_col is None or finding_col is None or not {"x", "y", "w", "h"} <= set(lower):
            fh.close()
            raise ValueError(
                f"unrecognised box CSV header ({_describe_header(header)}); expected NIH "
                "('Image Index,Finding Label,Bbox [x,y,w,h],,,') or 'file,finding,x,y,w,h'"
            )
        cols = [lower.index(c) for c in (image_col, finding_col, "x", "y", "w", "h")]
    boxes: list[Box] = []
    with fh:
        for line_no, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(cols):
                raise ValueError(f"{path.name} line {line_no}: expected 6 fields, got {len(row)}")
            try:
                x, y, w, h = (float(row[c]) for c in cols[2:])
            except ValueError:
                raise ValueError(
                    f"{path.name} line {line_no}: box coordinates must be numbers, got "
                    f"{[row[c] for c in cols[2:]]}"
                ) from None
            boxes.append(
                Box(row[cols[0]].strip(), resolve_finding(row[cols[1]].strip()), x, y, w, h)
            )
    return boxes
