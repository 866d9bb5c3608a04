"""The folder tables: each folder's predictions table ``cxrtool_predictions.csv`` (one row
per study and model, written by :class:`FolderOutputs`) and its index
``cxrtool_predictions.json`` (each model's findings and thresholds), read back for
evaluation (:func:`read_prediction_tables`); and the radiomics table's columns."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrtool.io.outputs import FOLDER_CSV, FOLDER_JSON, SharedTable, read_csv_rows, update_json
from cxrtool.io.records.schema import MODEL_ID_LENGTH, SCHEMA_VERSION, ModelRef, NewerSchemaError, RecordError, Result, Sidecar

INDEX_SCHEMA = "cxrtool-folder"
TABLE_FIRST = ("file", "model", "model_id")
TABLE_LAST = ("view_position", "error")
# The radiomics table: these columns, then the features, then PyRadiomics' diagnostics.
RADIOMICS_FIRST = ("image", "mask", "label", "finding", "region", "model", "status", "error")
RADIOMICS_KEY = ("image", "mask", "label")


# ----------------------------------------------------------------------------- folder table


def table_row(sidecar: Sidecar, result: Result) -> dict[str, Any]:
    row: dict[str, Any] = {"file": sidecar.file, "model": result.model.name, "model_id": result.model.id}
    row.update({name: call.probability for name, call in result.findings.items()})
    row.update(view_position=sidecar.view_position, error="")
    return row


def failure_row(file_name: str, model: ModelRef, reason: str) -> dict[str, Any]:
    return {"file": file_name, "model": model.name, "model_id": model.id, "error": reason}


class FolderOutputs:
    """The shared per-folder outputs of a run: each folder's table and index.

    Rows are queued per study and written every few seconds and at the end, each time
    merged with what is on disk under the folder's lock (:class:`SharedTable`).
    """

    def __init__(self, model: ModelRef, index_entry: Mapping[str, Any], *, flush_every: float = 10.0) -> None:
        self.model = model
        self.index_entry = dict(index_entry)
        self.tables: dict[Path, SharedTable] = {}
        self.flush_every = flush_every
        self._last_flush = time.monotonic()

    def _table(self, folder: Path) -> SharedTable:
        if folder not in self.tables:
            self.tables[folder] = SharedTable(folder / FOLDER_CSV, ("file", "model_id"), first=TABLE_FIRST,
                                              last=TABLE_LAST, read_rows=read_table_rows)
        return self.tables[folder]

    def study(self, folder: Path, file_name: str, sidecar: Sidecar | None, *, failure: str | None = None,
              stale: bool = False) -> None:
        """Set the study's rows: one per result its sidecar holds (rows of models whose
        results went stale are dropped), or this model's failure."""
        table = self._table(folder)
        if stale or sidecar is None:
            table.drop(lambda row, name=file_name: row.get("file") == name)
        if sidecar is not None:
            for result in sidecar.results:
                table.put(table_row(sidecar, result))
        if failure is not None:
            table.put(failure_row(file_name, self.model, failure))
        if time.monotonic() - self._last_flush > self.flush_every:
            self.flush()

    def flush(self) -> None:
        for table in self.tables.values():
            table.flush()
        self._last_flush = time.monotonic()

    def finish(self) -> list[Path]:
        """Write every table and record this model in each folder's index."""
        self.flush()
        for folder in self.tables:
            update_json(folder / FOLDER_JSON, lambda current: _index_with(current, self.model, self.index_entry))
        return sorted(self.tables)


# ----------------------------------------------------------------------------- folder index


@dataclass(frozen=True)
class IndexedModel:
    """A model's entry in a folder index: its findings and decision thresholds."""

    model: ModelRef
    findings: list[str]
    thresholds: dict[str, float]
    threshold_method: str = ""
    cxrtool_version: str = ""
    zero_shot: list[str] = field(default_factory=list)  # findings scored from descriptions


def index_entry(model: ModelRef, card: Any, thresholds: Sequence[float], version: str) -> dict[str, Any]:
    return {
        **model.to_dict(),
        "findings": list(card.findings),
        "thresholds": {f: round(float(t), 6) for f, t in zip(card.findings, thresholds, strict=True)},
        "threshold_method": card.threshold_method,
        **({"zero_shot": list(card.zero_shot_findings)} if getattr(card, "zero_shot_findings", None) else {}),
        "cxrtool_version": version,
    }


def _index_with(current: Any, model: ModelRef, entry: Mapping[str, Any]) -> dict[str, Any]:
    models = {m.model.id: _entry_dict(m) for m in _parse_index(current, where="index")} if current else {}
    models[model.id] = dict(entry)
    return {"schema": INDEX_SCHEMA, "schema_version": SCHEMA_VERSION, "models": models}


def _entry_dict(entry: IndexedModel) -> dict[str, Any]:
    return {**entry.model.to_dict(), "findings": entry.findings, "thresholds": entry.thresholds,
            "threshold_method": entry.threshold_method, **({"zero_shot": entry.zero_shot} if entry.zero_shot else {}),
            "cxrtool_version": entry.cxrtool_version}


def _parse_index(values: Any, *, where: str) -> list[IndexedModel]:
    if not isinstance(values, Mapping):
        raise RecordError(f"{where}: not a cxrtool folder index (expected a JSON object)")
    version = values.get("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise NewerSchemaError(f"{where}: written by a newer cxrtool (schema {version}); upgrade cxrtool")
    entries = list((values.get("models") or {}).values()) if "models" in values else [
        {**(values.get("model") or {}), **{k: values.get(k) for k in ("findings", "thresholds", "threshold_method",
                                                                       "cxrtool_version")}}]
    parsed = []
    for entry in entries:
        try:
            thresholds = {str(k): float(v) for k, v in (entry.get("thresholds") or {}).items()}
        except (TypeError, ValueError, AttributeError):
            raise RecordError(f"{where}: thresholds are not numbers") from None
        if any(not math.isfinite(v) for v in thresholds.values()):
            raise RecordError(f"{where}: thresholds are not finite numbers")
        parsed.append(IndexedModel(ModelRef.from_dict(entry), [str(f) for f in entry.get("findings") or []], thresholds,
                                   str(entry.get("threshold_method") or ""), str(entry.get("cxrtool_version") or ""),
                                   [str(f) for f in entry.get("zero_shot") or []]))
    return parsed


def read_index(table_csv: Path) -> list[IndexedModel]:
    """The models recorded in the index beside a predictions table ([] when there is none).

    Raises:
        RecordError: an index that exists but cannot be read (it is not ignored: its
            thresholds decide the calls a report counts).
    """
    path = table_csv.with_name(FOLDER_JSON) if table_csv.name == FOLDER_CSV else table_csv.with_suffix(".json")
    if not path.is_file():
        return []
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: the recorded thresholds cannot be read ({error}); fix or remove the file") from None
    return _parse_index(values, where=str(path))


def read_table_rows(path: Path) -> list[dict[str, str]]:
    """A predictions table's rows, each with ``model`` and ``model_id``: a schema-1 table
    (no model columns) takes its one model from the index beside it."""
    rows = read_csv_rows(path)
    if rows and "model_id" not in rows[0]:
        try:
            models = read_index(path)
        except RecordError:
            models = []
        model = models[0].model if len(models) == 1 else ModelRef("", "", "")
        for row in rows:
            row.setdefault("model", model.name)
            row["model_id"] = model.id
    return rows


@dataclass
class PredictionTable:
    """The rows of one or more predictions tables, for evaluation.

    Attributes:
        rows: every row, with ``path`` (the study's path: the table's folder and its file).
        models: model id -> what the indexes and rows say of it.
    """

    rows: list[dict[str, str]]
    models: dict[str, IndexedModel]
    sources: list[Path]

    def choose(self, wanted: str | None) -> IndexedModel | None:
        """The model whose rows to score: ``wanted`` is a model id (or its prefix), a name,
        or a checkpoint's SHA-256; None is fine when the tables hold one model.

        Raises:
            RecordError: several models and none chosen, or no model by that name.
        """
        if wanted is None:
            if len(self.models) > 1:
                listed = "; ".join(f"{m.model.name or '?'} (id {mid})" for mid, m in self.models.items())
                raise RecordError(f"the predictions hold rows of {len(self.models)} models: {listed}; "
                                  "choose one with --model (a checkpoint, a model name or an id)")
            return next(iter(self.models.values()), None)
        matches = [m for mid, m in self.models.items()
                   if wanted in (m.model.name, m.model.sha256) or (len(wanted) >= 6 and mid and mid.startswith(wanted[:MODEL_ID_LENGTH]))]
        if not matches and len(self.models) == 1 and not next(iter(self.models)):
            return next(iter(self.models.values()))  # a first-release table that does not say which model made it
        if len(matches) != 1:
            listed = ", ".join(f"{m.model.name or '?'} (id {mid})" for mid, m in self.models.items()) or "none"
            what = "several models match" if matches else "no model matches"
            raise RecordError(f"{what} {wanted!r} in the predictions; they hold: {listed}")
        return matches[0]

    def rows_of(self, model: IndexedModel | None) -> list[dict[str, str]]:
        if model is None:
            return list(self.rows)
        return [row for row in self.rows if row.get("model_id", "") == model.model.id]


def read_prediction_tables(sources: Sequence[str | os.PathLike]) -> PredictionTable:
    """Read predictions tables: CSV files, or folders searched (recursively) for
    ``cxrtool_predictions.csv``. Each row's ``path`` is its study's path (the table's folder
    joined with its ``file``), so studies of a tree keep their folders.

    Raises:
        FileNotFoundError: a source that does not exist, or a folder without tables.
        RecordError: an unreadable index.
    """
    tables: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(path.rglob(FOLDER_CSV))
            if not found:
                raise FileNotFoundError(f"{path}: no {FOLDER_CSV} in this folder or below it")
            tables.extend(found)
        elif path.is_file():
            tables.append(path)
        else:
            raise FileNotFoundError(f"predictions file not found: {path}")
    rows: list[dict[str, str]] = []
    models: dict[str, IndexedModel] = {}
    for table in tables:
        for entry in read_index(table):
            models.setdefault(entry.model.id, entry)
        for row in read_table_rows(table):
            row["path"] = str(table.parent / row.get("file", ""))
            rows.append(row)
            model_id = row.get("model_id", "")
            if model_id not in models:
                models[model_id] = IndexedModel(ModelRef(row.get("model", ""), "", model_id), [], {})
    return PredictionTable(rows, models, tables)

