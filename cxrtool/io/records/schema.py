"""The sidecar's schema: which model made a result (:class:`ModelRef`), each finding's
call (:class:`FindingCall`), one model's :class:`Result` on a study, and the
:class:`Sidecar` that holds a study's identity and every model's result (schema version 2;
version 1 sidecars are read and upgraded); :func:`make_result` builds a result from a
model's probabilities, and the errors records raise."""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrtool.io.records.explanations import Explanation
from cxrtool.io.records.provenance import Fingerprint, Provenance

SIDECAR_SCHEMA = "cxrtool-sidecar"
SCHEMA_VERSION = 2
MODEL_ID_LENGTH = 12  # hex digits of a checkpoint's SHA-256 that name it in tables and file names
IDENTITY_KEYS = ("sop_instance_uid", "transfer_syntax", "format")


class RecordError(ValueError):
    """A record cxrtool cannot read (a newer schema, a corrupt index); says what to do."""


class NewerSchemaError(RecordError):
    """A record written by a newer cxrtool: it is neither read nor overwritten."""


class StudyFailure(Exception):
    """One study's failure with its one-line reason (a non-finite model output, ...)."""


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
        explanations: what ``explain`` found (:class:`~cxrtool.io.records.explanations.Explanation`:
            method, layer, request, per finding its map's peak, regions, trust, files), or None.
        warnings: what the reader noticed about the file, for the record.
        calibration: for a calibrated model, how its probabilities were calibrated and what
            the calls were made on.
        ensemble: for a bundle, the study's projection (and where it came from), its route,
            the merge, and each member's probabilities.
        outputs: output stage -> the files it wrote beside the study for this result (names
            in the sidecar's folder; :mod:`cxrtool.stages`).
    """

    model: ModelRef
    findings: dict[str, FindingCall]
    settings: dict[str, Any] = field(default_factory=dict)
    explanations: Explanation | None = None
    warnings: list[str] = field(default_factory=list)
    cxrtool_version: str = ""
    created: str = ""
    calibration: dict[str, Any] | None = None
    ensemble: dict[str, Any] | None = None
    outputs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def positive_findings(self) -> list[str]:
        return [name for name, call in self.findings.items() if call.positive]

    def files(self) -> list[str]:
        """The files (names in the sidecar's folder) written for this result: its
        explanations' maps, masks and overlays, and what its output stages wrote. Storing a
        result removes the files its predecessor listed and it does not."""
        made = self.explanations.files() if self.explanations is not None else []
        return made + [name for names in self.outputs.values() for name in names]

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
            record["explanations"] = self.explanations.to_dict()
        if self.warnings:
            record["warnings"] = list(self.warnings)
        if self.outputs:
            record["outputs"] = {stage: list(names) for stage, names in self.outputs.items()}
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
            explanations=Explanation.from_dict(explanations) if isinstance(explanations, dict) else None,
            warnings=[str(w) for w in values.get("warnings") or []],
            cxrtool_version=str(values.get("cxrtool_version", "")),
            created=str(values.get("created", "")),
            calibration=values.get("calibration") if isinstance(values.get("calibration"), dict) else None,
            ensemble=values.get("ensemble") if isinstance(values.get("ensemble"), dict) else None,
            outputs={str(stage): [str(name) for name in names] for stage, names in (values.get("outputs") or {}).items()
                     if isinstance(names, list)} if isinstance(values.get("outputs"), dict) else {},
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
            if v1.explanations and "request" in values.get("explanations", {}):
                v1.settings["explain"] = v1.explanations.request
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
