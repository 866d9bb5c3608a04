"""Joining predictions with labels: cxrtool's predictions tables read into score arrays,
their rows matched to a label table's rows by file path, and the thresholds recorded
beside them.

Example:
    >>> files, names, scores, counts, notes, chosen = _read_predictions(sources, table.findings, None)
    >>> pred_rows, label_rows, match_counts = _match(files, table)
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cxrtool.data.labels import LabelTable
from cxrtool.io.records import IndexedModel, read_prediction_tables
from cxrtool.registry import resolve_finding

__all__ = ["recorded_thresholds"]

_NOT_FINDINGS = {"file", "model", "model_id", "view_position", "error", "path"}


def _read_predictions(
    sources: Sequence[Path], label_findings: Sequence[str], model: str | None
) -> tuple[list[str], list[str], np.ndarray, dict[str, int], list[str], IndexedModel | None]:
    """Read cxrtool's predictions tables: each row's study path, the evaluated findings,
    the scores, counts, notes, and the model whose rows they are."""
    for path in sources:
        if path.is_file():
            with open(path, encoding="utf-8-sig", newline="") as fh:
                header = next(csv.reader(fh), None)
            if header is None:
                raise ValueError(f"{path}: empty predictions file, expected a header")
            if "file" not in [h.strip().lower() for h in header]:
                raise ValueError(f"{path.name}: predictions need a 'file' column; header has {header[:8]}")
    tables = read_prediction_tables(sources)
    chosen = tables.choose(model)
    rows = tables.rows_of(chosen)
    where = ", ".join(p.name for p in tables.sources[:3]) + (" ..." if len(tables.sources) > 3 else "")
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(c.strip() for c in row if c and c.strip().lower() not in _NOT_FINDINGS))
    if chosen is not None and chosen.findings:
        columns = {c: None for c in columns if resolve_finding(c) in {resolve_finding(f) for f in chosen.findings}}
    known = {resolve_finding(f) for f in label_findings}  # one name per finding, whichever data set spelled it
    cols = [c for c in columns if resolve_finding(c) in known]
    names = [resolve_finding(c) for c in cols]
    if not cols:
        raise ValueError(
            f"{where}: no prediction column matches a label finding (prediction columns: {list(columns)[:10]}; "
            f"label findings: {list(label_findings)[:10]})"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: duplicate finding columns {names}")
    files: list[str] = []
    scores: list[list[float]] = []
    counts = {"prediction_rows": 0, "error_rows": 0, "incomplete_rows": 0}
    for row in rows:
        if not any((value or "").strip() for key, value in row.items() if key != "path"):
            continue
        counts["prediction_rows"] += 1
        if (row.get("error") or "").strip():
            counts["error_rows"] += 1
            continue
        cells = [(row.get(c) or "").strip() for c in cols]
        values = [_probability(cell, column, row, where) for cell, column in zip(cells, cols, strict=True)]
        if all(math.isnan(v) for v in values):
            counts["incomplete_rows"] += 1
            continue
        # Some empty: findings this study was not scored for (a bundle's route without
        # them); they are left out of those findings' metrics only.
        files.append(row["path"])
        scores.append(values)
    notes = []
    ignored = [c for c in columns if c not in cols]
    if ignored:
        notes.append(f"prediction columns not evaluated: {', '.join(ignored)}")
    if len(tables.models) > 1 and chosen is not None:
        notes.append(f"rows of model {chosen.model.name or '?'} (id {chosen.model.id}) of the "
                     f"{len(tables.models)} models in the predictions")
    array = np.asarray(scores, dtype=np.float64).reshape(len(files), len(names))
    return files, names, array, counts, notes, chosen


def _probability(cell: str, column: str, row: dict[str, str], where: str) -> float:
    """A probability cell: a number in [0, 1], or empty (a finding this study was not scored
    for). Anything else is refused, naming the row: a percentage, a logit, a written-out
    ``nan`` or ``inf`` is not a probability, and metrics on it would be quietly wrong.

    Raises:
        ValueError: the cell is not a probability.
    """
    if not cell:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        hint = " (percentages? divide by 100)" if value is not None and 1.0 < value <= 100.0 else ""
        raise ValueError(f"{where}: {column} of {row.get('file') or row.get('path')} is {cell[:40]!r}, not a probability "
                         f"in [0, 1]{hint}; an empty cell means not scored")
    return value


def _path_parts(path: str) -> list[str]:
    # Plain string splitting: PurePosixPath per row costs seconds over 112,120 NIH rows.
    return [p for p in path.replace("\\", "/").split("/") if p]


def _match(files: Sequence[str], table: LabelTable) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Join prediction files to label rows on the file name.

    File names are unique in NIH-style data, but not in CheXpert (``view1_frontal.jpg``
    in every study), so an ambiguous name is retried with its parent folders until one
    label row matches.
    """
    by_name: dict[str, list[int]] = {}
    first_row: dict[str, int] = {}
    repeated_labels = 0
    for i, image in enumerate(table.images):
        key = image.replace("\\", "/")
        if key in first_row:  # the same image listed twice: its first row is its label
            repeated_labels += 1
            continue
        first_row[key] = i
        by_name.setdefault(key.rpartition("/")[2], []).append(i)
    label_parts: dict[int, tuple[str, ...]] = {}  # only for rows whose name repeats

    def suffix(i: int, depth: int) -> tuple[str, ...]:
        if i not in label_parts:
            label_parts[i] = tuple(_path_parts(table.images[i]))
        return label_parts[i][-depth:]

    pred_rows: list[int] = []
    label_rows: list[int] = []
    seen: set[int] = set()
    counts = {"unmatched_predictions": 0, "ambiguous_predictions": 0, "duplicate_predictions": 0,
              "repeated_label_rows": repeated_labels}
    for p, file in enumerate(files):
        parts = _path_parts(file)
        candidates = by_name.get(parts[-1], []) if parts else []
        several = len(candidates) > 1
        depth = 1
        while len(candidates) > 1 and depth < len(parts):
            depth += 1
            want = tuple(parts[-depth:])
            candidates = [i for i in candidates if suffix(i, depth) == want]
        if len(candidates) != 1:
            counts["ambiguous_predictions" if candidates or several else "unmatched_predictions"] += 1
            continue
        hit = candidates[0]
        if hit in seen:
            counts["duplicate_predictions"] += 1
            continue
        seen.add(hit)
        pred_rows.append(p)
        label_rows.append(hit)
    counts["matched"] = len(pred_rows)
    counts["labels_without_prediction"] = len(first_row) - len(seen)
    return np.asarray(pred_rows, dtype=np.int64), np.asarray(label_rows, dtype=np.int64), counts


def recorded_thresholds(predictions_csv: str | os.PathLike[str], model: str | None = None) -> dict[str, float] | None:
    """The decision thresholds ``predict`` recorded beside a predictions table for a model
    (a name or id; may be left out when one model is recorded), or None when none are.

    Raises:
        ValueError: a recorded index that cannot be read, or several models and none chosen.
    """
    from cxrtool.io.records import PredictionTable, read_index

    entries = read_index(Path(predictions_csv))
    if not entries:
        return None
    chosen = PredictionTable([], {entry.model.id: entry for entry in entries}, []).choose(model)
    return dict(chosen.thresholds) if chosen is not None else None
