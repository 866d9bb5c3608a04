"""Low-level CSV helpers shared by the label, projection, box and unlabelled-image readers.

The leaf of :mod:`cxrtool.data.labels`: it imports nothing from its sibling modules.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

# Generic-CSV columns that describe the row rather than name a finding.
_GENERIC_PATH_COLUMNS = ("path", "file", "image", "filename")
_GENERIC_PATIENT_COLUMNS = ("patient_id", "patient")
_GENERIC_VIEW_COLUMNS = ("view", "view_position")


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

