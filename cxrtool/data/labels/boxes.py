"""Radiologist bounding boxes: :class:`Box` and :func:`read_boxes`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cxrtool.data.labels._csv import _describe_header, _read_csv
from cxrtool.registry import resolve_finding


@dataclass
class Box:
    """One radiologist bounding box, in pixels of the original image (x, y = top left)."""

    image: str
    finding: str
    x: float
    y: float
    w: float
    h: float


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
