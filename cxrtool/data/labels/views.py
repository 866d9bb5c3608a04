"""Projections (PA, AP, LATERAL) of images by their paths, from a label or metadata table:
:class:`ViewTable` and :func:`read_views`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from cxrtool.data.labels._csv import (
    _GENERIC_PATH_COLUMNS,
    _GENERIC_VIEW_COLUMNS,
    _describe_header,
    _normalize_view,
    _read_csv,
)
from cxrtool.registry import PROJECTIONS

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
