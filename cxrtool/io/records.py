"""What cxrtool writes about studies, typed and versioned, with one reader and one writer.

* The **sidecar** ``NAME.cxrtool.json`` beside a study (or in the ``--out`` mirror): the
  study's identity (file name, where it is, its content's SHA-256, DICOM UIDs, view,
  spacing, size) and one :class:`Result` per model that scored it (probabilities,
  calls, explanations, the settings that produced them). Schema version 2; version 1
  sidecars (one flat record, one model) are read and upgraded.
* The **folder table** ``cxrtool_predictions.csv``: one row per (study, model) of its
  folder, ``file, model, model_id``, one probability column per finding of any model,
  then ``view_position, error``. The folder index ``cxrtool_predictions.json`` lists
  each model's findings and decision thresholds.
* **Already done** (:func:`is_done`): a result counts as done when it was made from the
  same file content, by the same producer (a model's checkpoint digest, or the measuring
  code), with the same settings that change the result. Predict, explain and radiomics
  all decide by it.

A study's results describe one content of its file: when the file changes, the results
made from the old content are stale and are dropped (with the pictures they list)
by the next run that sees the change, so nothing stale stays beside a study.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cxrtool.io.outputs import (
    FOLDER_CSV,
    FOLDER_JSON,
    SIDECAR_SUFFIX,
    SharedTable,
    folder_lock,
    read_csv_rows,
    sidecar_path,
    update_json,
    write_json,
)

SIDECAR_SCHEMA = "cxrtool-sidecar"
INDEX_SCHEMA = "cxrtool-folder"
SCHEMA_VERSION = 2
MODEL_ID_LENGTH = 12  # hex digits of a checkpoint's SHA-256 that name it in tables and file names
TABLE_FIRST = ("file", "model", "model_id")
TABLE_LAST = ("view_position", "error")
# The radiomics table: these columns, then the features, then PyRadiomics' diagnostics.
RADIOMICS_FIRST = ("image", "mask", "label", "finding", "region", "model", "status", "error")
RADIOMICS_KEY = ("image", "mask", "label")
IDENTITY_KEYS = ("sop_instance_uid", "transfer_syntax", "format")
# A file modified this recently may change again within the file system's timestamp
# resolution without its stat changing: its stat is not trusted for the quick check.
_RACY_SECONDS = 2.0


class RecordError(ValueError):
    """A record cxrtool cannot read (a newer schema, a corrupt index); says what to do."""


class NewerSchemaError(RecordError):
    """A record written by a newer cxrtool: it is neither read nor overwritten."""


class StudyFailure(Exception):
    """One study's failure with its one-line reason (a non-finite model output, ...)."""


# ----------------------------------------------------------------------------- provenance


@dataclass(frozen=True)
class Fingerprint:
    """A file's content (SHA-256) and, for the quick check, the stat it had when hashed.

    :meth:`same_content` trusts an unchanged stat (size, modification and change times,
    inode: the file was not touched since) and otherwise hashes the file again, so a
    copied or touched study costs a hash, never a wrong answer.
    """

    sha256: str
    size: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    inode: int | None = None

    @classmethod
    def of(cls, path: str | os.PathLike) -> Fingerprint:
        before = os.stat(path)
        digest = sha256_file(path)
        after = os.stat(path)
        stable = _stat_key(before) == _stat_key(after) and time.time() - after.st_mtime > _RACY_SECONDS
        if not stable:
            return cls(digest)  # changing under us, or too fresh to trust its stat later
        return cls(digest, after.st_size, after.st_mtime_ns, after.st_ctime_ns, after.st_ino)

    def unchanged_stat(self, path: str | os.PathLike) -> bool:
        if self.size is None:
            return False
        try:
            return _stat_key(os.stat(path)) == (self.size, self.mtime_ns, self.ctime_ns, self.inode)
        except OSError:
            return False

    def same_content(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` holds the content this fingerprint was taken of."""
        if self.unchanged_stat(path):
            return True
        try:
            return sha256_file(path) == self.sha256
        except OSError:
            return False

    def to_dict(self) -> dict[str, Any]:
        stat = {k: getattr(self, k) for k in ("size", "mtime_ns", "ctime_ns", "inode")}
        return {"sha256": self.sha256, "stat": stat if self.size is not None else None}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> Fingerprint | None:
        if not isinstance(values, Mapping) or not isinstance(values.get("sha256"), str):
            return None
        stat = values.get("stat") or {}
        return cls(values["sha256"], *(stat.get(k) for k in ("size", "mtime_ns", "ctime_ns", "inode")))


def _stat_key(stat: os.stat_result) -> tuple[int, int, int, int]:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def settings_digest(settings: Any) -> str:
    """A short stable digest of settings (JSON with sorted keys)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Provenance:
    """What a result was made from: its input files, its producer, its settings.

    Attributes:
        inputs: role -> fingerprint of each input file (``image``, ``mask``).
        producer: what made it: a model's checkpoint SHA-256, or the measuring code.
        settings: stage -> the settings of that stage that change the result.
    """

    inputs: Mapping[str, Fingerprint]
    producer: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": {role: fp.to_dict() for role, fp in self.inputs.items()}, "producer": self.producer,
                "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, values: Any) -> Provenance | None:
        if not isinstance(values, Mapping):
            return None
        inputs = {role: Fingerprint.from_dict(fp) for role, fp in (values.get("inputs") or {}).items()}
        if any(fp is None for fp in inputs.values()):
            return None
        return cls(inputs, str(values.get("producer", "")), dict(values.get("settings") or {}))  # type: ignore[arg-type]


def is_done(
    recorded: Provenance | None,
    *,
    inputs: Mapping[str, str | os.PathLike | None],
    producer: str,
    settings: Mapping[str, Any],
) -> bool:
    """The one rule of "already done", for every command.

    A recorded result is done when its producer is ``producer``, each stage in ``settings``
    was run with exactly those settings (a result may hold more stages: a study explained
    is also predicted), and every input file still holds the content it was made from.
    """
    if recorded is None or recorded.producer != producer:
        return False
    if any(recorded.settings.get(stage) != wanted for stage, wanted in settings.items()):
        return False
    for role, path in inputs.items():
        fingerprint = recorded.inputs.get(role)
        if path is None:
            if fingerprint is not None:
                return False
            continue
        if fingerprint is None or not fingerprint.same_content(path):
            return False
    return True


# ----------------------------------------------------------------------------- sidecar


@dataclass(frozen=True)
class ModelRef:
    """Which model made a result: its card's name and architecture, and the checkpoint's digest."""

    name: str
    architecture: str
    sha256: str

    @property
    def id(self) -> str:
        """The short digest that names the model in tables and in file names."""
        return self.sha256[:MODEL_ID_LENGTH]

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "architecture": self.architecture, "sha256": self.sha256, "id": self.id}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelRef:
        return cls(str(values.get("name", "")), str(values.get("architecture", "")), str(values.get("sha256", "")))


@dataclass(frozen=True)
class FindingCall:
    """One finding's call. ``probability`` is what the call is made on: the calibrated
    probability when the model is calibrated (then ``raw_probability`` is the model's own)."""

    probability: float
    threshold: float
    positive: bool
    raw_probability: float | None = None
    zero_shot: bool = False  # scored from a text description the model never trained on: uncalibrated

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"probability": self.probability, "threshold": self.threshold, "positive": self.positive}
        if self.raw_probability is not None:
            values["raw_probability"] = self.raw_probability
        if self.zero_shot:
            values.update(zero_shot=True, calibrated=False)
        return values


@dataclass
class Result:
    """One model's result on one study.

    Attributes:
        model: the model that made it.
        findings: finding -> probability, threshold and call, in the model's order.
        settings: stage ("predict", "explain") -> the settings of that stage.
        explanations: what ``explain`` found (method, layer, request, per finding: map
            peak, regions, files), or None.
        warnings: what the reader noticed about the file, for the record.
        calibration: for a calibrated model, how its probabilities were calibrated and what
            the calls were made on.
        ensemble: for a bundle, the study's projection (and where it came from), its route,
            the merge, and each member's probabilities.
    """

    model: ModelRef
    findings: dict[str, FindingCall]
    settings: dict[str, Any] = field(default_factory=dict)
    explanations: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    cxrtool_version: str = ""
    created: str = ""
    calibration: dict[str, Any] | None = None
    ensemble: dict[str, Any] | None = None

    @property
    def positive_findings(self) -> list[str]:
        return [name for name, call in self.findings.items() if call.positive]

    def files(self) -> list[str]:
        """The files (names in the sidecar's folder) this result's explanations wrote."""
        found: list[str] = []
        for entry in (self.explanations or {}).get("findings", {}).values():
            found.extend(str(name) for name in (entry.get("files") or {}).values())
        return found

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "model": self.model.to_dict(),
            "findings": {name: call.to_dict() for name, call in self.findings.items()},
            "positive_findings": self.positive_findings,
            "settings": self.settings,
        }
        if self.calibration:
            record["calibration"] = self.calibration
        if self.ensemble:
            record["ensemble"] = self.ensemble
        if self.explanations is not None:
            record["explanations"] = self.explanations
        if self.warnings:
            record["warnings"] = list(self.warnings)
        record["cxrtool_version"] = self.cxrtool_version
        record["created"] = self.created
        return record

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Result:
        findings = {
            str(name): FindingCall(float(call["probability"]), float(call["threshold"]), bool(call["positive"]),
                                   None if call.get("raw_probability") is None else float(call["raw_probability"]),
                                   bool(call.get("zero_shot", False)))
            for name, call in (values.get("findings") or {}).items()
        }
        explanations = values.get("explanations")
        return cls(
            model=ModelRef.from_dict(values.get("model") or {}),
            findings=findings,
            settings=dict(values.get("settings") or {}),
            explanations=explanations if isinstance(explanations, dict) else None,
            warnings=[str(w) for w in values.get("warnings") or []],
            cxrtool_version=str(values.get("cxrtool_version", "")),
            created=str(values.get("created", "")),
            calibration=values.get("calibration") if isinstance(values.get("calibration"), dict) else None,
            ensemble=values.get("ensemble") if isinstance(values.get("ensemble"), dict) else None,
        )


@dataclass
class Sidecar:
    """Everything cxrtool knows about one study: its identity and each model's result.

    ``source`` is the study's path relative to the sidecar's folder (the file name when
    the sidecar is beside it), so an ``--out`` tree still leads back to its images.
    """

    file: str
    source: str
    fingerprint: Fingerprint
    view_position: str = "UNKNOWN"
    view_source: str | None = None  # where the projection came from: "tag" (DICOM) or "metadata" (a table)
    pixel_spacing_mm: list[float] | None = None
    image_size: list[int] | None = None
    identity: dict[str, str] = field(default_factory=dict)
    patient_id: str | None = None
    results: list[Result] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return self.fingerprint.sha256

    def result_for(self, model_id: str) -> Result | None:
        return next((result for result in self.results if result.model.id == model_id), None)

    def provenance(self, model_id: str) -> Provenance | None:
        """The provenance of this model's result, for :func:`is_done`."""
        result = self.result_for(model_id)
        if result is None:
            return None
        return Provenance({"image": self.fingerprint}, result.model.sha256, result.settings)

    def put(self, result: Result) -> Result | None:
        """Add a model's result, replacing (and returning) its earlier one."""
        previous = self.result_for(result.model.id)
        self.results = [r for r in self.results if r.model.id != result.model.id] + [result]
        return previous

    def source_path(self, folder: Path) -> Path:
        return folder / self.source

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "schema": SIDECAR_SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "file": self.file,
            "source": self.source,
            "sha256": self.fingerprint.sha256,
            "file_stat": self.fingerprint.to_dict()["stat"],
            **{k: v for k, v in self.identity.items() if k in IDENTITY_KEYS},
            "view_position": self.view_position,
            **({"view_source": self.view_source} if self.view_source else {}),
            "pixel_spacing_mm": self.pixel_spacing_mm,
            "image_size": self.image_size,
        }
        if self.patient_id is not None:
            record["patient_id"] = self.patient_id
        record["results"] = [result.to_dict() for result in self.results]
        return record

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Sidecar:
        version = values.get("schema_version", 1)
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise NewerSchemaError(f"sidecar written by a newer cxrtool (schema {version}); upgrade cxrtool")
        fingerprint = Fingerprint.from_dict({"sha256": values.get("sha256"), "stat": values.get("file_stat")})
        if fingerprint is None:
            raise RecordError("sidecar without the study's sha256")
        if "results" in values:
            results = [Result.from_dict(r) for r in values["results"]]
        else:  # schema 1: one flat record of one model
            v1 = Result.from_dict(values)
            v1.settings = {"predict": {}}
            if v1.explanations and "request" in v1.explanations:
                v1.settings["explain"] = v1.explanations["request"]
            results = [v1]
        return cls(
            file=str(values.get("file", "")),
            source=str(values.get("source") or values.get("file", "")),
            fingerprint=fingerprint,
            view_position=str(values.get("view_position", "UNKNOWN")),
            view_source=values.get("view_source") if isinstance(values.get("view_source"), str) else None,
            pixel_spacing_mm=values.get("pixel_spacing_mm"),
            image_size=values.get("image_size"),
            identity={k: str(values[k]) for k in IDENTITY_KEYS if values.get(k)},
            patient_id=values.get("patient_id"),
            results=results,
        )

    def flat(self, result: Result) -> dict[str, Any]:
        """One result as a flat record (the ``--jsonl`` stream): the study's identity with
        the model's probabilities, calls and explanations."""
        record = {k: v for k, v in self.to_dict().items() if k not in ("schema", "schema_version", "results", "file_stat")}
        record.update({k: v for k, v in result.to_dict().items() if k not in ("cxrtool_version", "created")})
        record["cxrtool_version"] = result.cxrtool_version
        return record


def read_sidecar(path: Path) -> Sidecar | None:
    """The sidecar at ``path``; None when there is none or it is not a readable cxrtool
    sidecar (it is then written afresh).

    Raises:
        RecordError: a sidecar from a newer cxrtool (rewriting it would lose what it holds).
    """
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(values, dict) or ("results" not in values and "findings" not in values):
        return None
    try:
        return Sidecar.from_dict(values)
    except NewerSchemaError as error:
        raise NewerSchemaError(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError):  # RecordError included: not a usable sidecar
        return None


def iter_sidecars(folder: Path, *, recursive: bool = False) -> Iterable[tuple[Path, Sidecar]]:
    """Every readable sidecar in a folder (and below it, with ``recursive``), by path."""
    pattern = f"**/*{SIDECAR_SUFFIX}" if recursive else f"*{SIDECAR_SUFFIX}"
    for path in sorted(folder.glob(pattern)):
        sidecar = read_sidecar(path)
        if sidecar is not None:
            yield path, sidecar


def relative_source(study: Path, folder: Path) -> str:
    """The study's path relative to the folder its sidecar is in."""
    try:
        return os.path.relpath(study.absolute(), folder.absolute())
    except ValueError:  # another drive (Windows)
        return str(study.absolute())


@dataclass
class SidecarUpdate:
    """What writing one result into a sidecar changed."""

    sidecar: Sidecar | None
    replaced: Result | None = None  # this model's earlier result
    stale: list[Result] = field(default_factory=list)  # other models' results of an older content
    removed_files: list[str] = field(default_factory=list)


def store_result(
    folder: Path,
    study: Sidecar,
    result: Result,
    *,
    keep: Callable[[Result, Result], Result] | None = None,
) -> SidecarUpdate:
    """Write ``result`` into the study's sidecar under the folder's lock.

    Results of other models stay, unless they were made from another content of the file
    (stale: dropped, with the pictures they list). ``keep(previous, new)`` may carry parts
    of this model's previous result over (predict keeps explain's maps of the same
    content). Pictures the replaced result listed and the new one does not are removed.
    """
    path = sidecar_path(folder, study.file)
    with folder_lock(folder):
        on_disk = read_sidecar(path)
        update = SidecarUpdate(None)
        merged = replace(study, results=[])
        if on_disk is not None:
            if on_disk.sha256 == study.sha256:
                merged.results = list(on_disk.results)
            else:
                update.stale = list(on_disk.results)
        previous = merged.result_for(result.model.id)
        if previous is not None and keep is not None:
            result = keep(previous, result)
        merged.put(result)
        update.replaced = previous
        write_json(path, merged.to_dict())
        update.sidecar = merged
        kept = set(result.files())
        gone = [*(previous.files() if previous else []), *(f for r in update.stale for f in r.files())]
        update.removed_files = _remove_pictures(folder, study.file, [f for f in gone if f not in kept])
    return update


def settle_failure(folder: Path, study: Path, fingerprint: Fingerprint | None, model_id: str) -> SidecarUpdate:
    """A study that failed now: results made from another content of the file (or of a
    file that is gone) are stale and go, with their pictures, and so does this model's own
    earlier result (its latest attempt failed); other models' results of the same content
    stay, and so do they when the file is there but could not be read at all (nothing says
    it changed)."""
    file_name = study.name
    path = sidecar_path(folder, file_name)
    if not path.is_file():
        return SidecarUpdate(None)
    with folder_lock(folder):
        on_disk = read_sidecar(path)
        if on_disk is None:
            return SidecarUpdate(None)
        if fingerprint is None:
            same = study.exists()  # unreadable now (permissions, a lock): no sign of a change
        else:
            same = on_disk.sha256 == fingerprint.sha256
        gone = [r for r in on_disk.results if not same or r.model.id == model_id]
        if not gone:
            return SidecarUpdate(on_disk)
        on_disk.results = [r for r in on_disk.results if r not in gone]
        if on_disk.results:
            write_json(path, on_disk.to_dict())
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed = _remove_pictures(folder, file_name, [f for r in gone for f in r.files()])
        return SidecarUpdate(on_disk if on_disk.results else None, stale=[] if same else gone, removed_files=removed)


def _remove_pictures(folder: Path, study_name: str, names: Iterable[str]) -> list[str]:
    """Remove files a result listed: only plain names in this folder that belong to the study."""
    removed = []
    for name in dict.fromkeys(names):
        if Path(name).name != name or not name.startswith(f"{study_name}.cxrtool."):
            continue  # never follow a path a sidecar names outside its own outputs
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
            removed.append(name)
    return removed


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def make_result(
    model: ModelRef,
    findings: Sequence[str],
    probabilities: Sequence[float],
    thresholds: Sequence[float],
    *,
    settings: dict[str, Any],
    version: str,
    warnings: Sequence[str] = (),
    raw: Sequence[float] | None = None,
    calibration: dict[str, Any] | None = None,
    ensemble: dict[str, Any] | None = None,
    zero_shot: Sequence[str] = (),
) -> Result:
    """A model's result from its probabilities and thresholds (for a calibrated model: the
    calibrated probabilities, with the ``raw`` ones and a description of the
    ``calibration``).

    Raises:
        StudyFailure: when a probability is not a finite number (the study fails, alone).
    """
    bad = [name for name, p in zip(findings, probabilities, strict=True) if not math.isfinite(float(p))]
    if bad:
        shown = ", ".join(f"{name} ({float(p)})" for name, p in zip(findings, probabilities, strict=True) if name in bad[:4])
        raise StudyFailure(f"the model's output is not a finite number for {len(bad)} of {len(findings)} findings: {shown}")
    raws = [None] * len(findings) if raw is None else [round(float(r), 6) for r in raw]
    unseen = set(zero_shot)
    calls = {
        name: FindingCall(round(float(p), 6), round(float(t), 6), bool(p >= t), r, name in unseen)
        for name, p, t, r in zip(findings, probabilities, thresholds, raws, strict=True)
    }
    return Result(model, calls, settings=settings, warnings=list(warnings), cxrtool_version=version, created=now(),
                  calibration=calibration, ensemble=ensemble)


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

