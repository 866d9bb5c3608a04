"""The label table (:class:`LabelTable`) and its reader (:func:`read_labels`).

The CSV layouts it reads, and how each is parsed, live in :mod:`cxrtool.data.labels.formats`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cxrtool.data.labels._csv import _basename, _read_csv
from cxrtool.data.labels.formats import (
    _parse_chexpert,
    _parse_generic,
    _parse_nih,
    _parse_padchest,
    detect_format,
)
from cxrtool.registry import LABEL_FORMATS as _FORMATS
from cxrtool.registry import LABEL_SETS, PROJECTIONS, VIEW_POSITIONS, resolve_finding
from cxrtool.registry import UNCERTAIN_POLICIES as _POLICIES

UNCERTAIN_POLICIES = tuple(_POLICIES)
LABEL_FORMATS = _FORMATS


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
