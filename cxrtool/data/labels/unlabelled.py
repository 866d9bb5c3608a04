"""Radiographs without labels (``train --unlabelled``): :func:`read_unlabelled`."""

from __future__ import annotations

import os
from pathlib import Path

from cxrtool.data.labels._csv import _describe_header, _read_csv
from cxrtool.data.labels.views import _IMAGE_COLUMNS, _find_column


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
