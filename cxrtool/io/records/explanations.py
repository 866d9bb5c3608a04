"""What ``explain`` records of a result, typed: an :class:`Explanation` (the method, the layer,
the request, whose calls it explains) with one :class:`FindingMap` per finding mapped, each
with its :class:`Region` list, its trust verdict and the files it wrote.

The sidecar keeps them as JSON objects under the result's ``explanations``; these classes
read and write exactly that JSON (keys a later cxrtool adds are kept in ``extra`` and
written back), so radiomics, evaluate and the contact sheet read fields, not string keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _floats(values: Any) -> list[float] | None:
    return [float(v) for v in values] if isinstance(values, list | tuple) else None


def _extra(values: Mapping[str, Any], known: set[str]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if key not in known}


@dataclass
class Region:
    """One connected region of a thresholded map, in the study's original pixels.

    Attributes:
        label: its value in the mask file (1 for the strongest region, 2 for the next...).
        box: ``[x, y, w, h]`` in pixels.
        area_px: its area in pixels.
        peak: the map's peak inside it, and ``mean`` its mean (fractions of the map's peak).
        box_mm: the box in millimetres, and ``area_mm2`` its area, when the spacing is known.
        chest_share: the share of it that lies on the chest, when a chest was found.
    """

    label: int
    box: list[int]
    area_px: int = 0
    peak: float = 0.0
    mean: float = 0.0
    box_mm: list[float] | None = None
    area_mm2: float | None = None
    chest_share: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("label", "box", "area_px", "peak", "mean", "box_mm", "area_mm2", "chest_share")

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"label": self.label, "box": list(self.box), "area_px": self.area_px,
                                  "peak": self.peak, "mean": self.mean}
        if self.box_mm is not None:
            record.update(box_mm=list(self.box_mm), area_mm2=self.area_mm2)
        if self.chest_share is not None:
            record["chest_share"] = self.chest_share
        return {**record, **self.extra}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Region:
        return cls(label=int(values.get("label", 0)), box=[int(v) for v in values.get("box") or [0, 0, 0, 0]],
                   area_px=int(values.get("area_px", 0)), peak=float(values.get("peak", 0.0)),
                   mean=float(values.get("mean", 0.0)), box_mm=_floats(values.get("box_mm")),
                   area_mm2=None if values.get("area_mm2") is None else float(values["area_mm2"]),
                   chest_share=None if values.get("chest_share") is None else float(values["chest_share"]),
                   extra=_extra(values, set(cls._KEYS)))


@dataclass
class FindingMap:
    """One finding's map of one study, as recorded.

    Attributes:
        probability: the finding's probability the map explains, ``positive`` its call.
        map_max: the map's raw peak (the map files hold the map divided by it); 0 for a map
            that is zero everywhere (then no regions, and ``note`` says so).
        peak: the peak's ``[x, y]`` in pixels (``peak_mm`` in millimetres).
        trust: whether the map lies on the chest (:func:`cxrtool.explain.chest.judge_map`):
            ``chest_share``, ``outside_chest`` and a ``reason`` when not, ``chest`` "none"
            when no chest was found.
        threshold: the level the regions were cut at, as a fraction of the peak.
        regions: strongest first.
        files: kind ("map", "mask", "overlay") -> the file's name in the sidecar's folder.
        note: what else is worth knowing (regions left out, no evidence).
        faithfulness: the map's deletion and insertion scores, when measured.
        members: for a bundle, each member's raw peak.
    """

    probability: float
    positive: bool
    map_max: float = 0.0
    peak: list[int] | None = None
    peak_mm: list[float] | None = None
    trust: dict[str, Any] = field(default_factory=dict)
    threshold: float | None = None
    regions: list[Region] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    note: str | None = None
    faithfulness: dict[str, Any] | None = None
    members: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("probability", "positive", "map_max", "peak", "peak_mm", "trust", "threshold", "regions", "files",
             "note", "faithfulness", "members")

    @property
    def outside_chest(self) -> bool:
        return bool(self.trust.get("outside_chest"))

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"probability": self.probability, "positive": self.positive, "map_max": self.map_max}
        optional = {"peak": self.peak, "trust": self.trust or None, "peak_mm": self.peak_mm, "threshold": self.threshold}
        record.update({key: value for key, value in optional.items() if value is not None})
        record["regions"] = [region.to_dict() for region in self.regions]
        for key, value in (("note", self.note), ("files", self.files or None), ("faithfulness", self.faithfulness),
                           ("members", self.members)):
            if value is not None:
                record[key] = value
        return {**record, **self.extra}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FindingMap:
        files = values.get("files")
        trust = values.get("trust")
        return cls(
            probability=float(values.get("probability", 0.0)), positive=bool(values.get("positive", False)),
            map_max=float(values.get("map_max", 0.0)),
            peak=[int(v) for v in values["peak"]] if isinstance(values.get("peak"), list) else None,
            peak_mm=_floats(values.get("peak_mm")), trust=dict(trust) if isinstance(trust, dict) else {},
            threshold=None if values.get("threshold") is None else float(values["threshold"]),
            regions=[Region.from_dict(r) for r in values.get("regions") or [] if isinstance(r, dict)],
            files={str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else {},
            note=None if values.get("note") is None else str(values["note"]),
            faithfulness=values.get("faithfulness") if isinstance(values.get("faithfulness"), dict) else None,
            members=values.get("members") if isinstance(values.get("members"), dict) else None,
            extra=_extra(values, set(cls._KEYS)),
        )


@dataclass
class Explanation:
    """What ``explain`` made of one result.

    Attributes:
        method: the map method (a key of ``registry.CAM_METHOD_LABELS``).
        layer: the target layer's name (for a bundle: member -> its layer).
        request: the settings explain ran with (what "already done" compares).
        calls: whose calls the maps explain: "predict" (the stored result's) or "explain"
            (its own pass, when there was no stored result).
        findings: finding -> its map.
        note: why there is no map, when there is none.
    """

    method: str
    layer: Any = None
    request: dict[str, Any] = field(default_factory=dict)
    calls: str | None = None
    findings: dict[str, FindingMap] = field(default_factory=dict)
    note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("method", "layer", "request", "calls", "findings", "note")

    def files(self) -> list[str]:
        """The files its maps wrote (names in the sidecar's folder)."""
        return [name for entry in self.findings.values() for name in entry.files.values()]

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"method": self.method, "layer": self.layer, "request": self.request}
        if self.calls is not None:
            record["calls"] = self.calls
        record["findings"] = {name: entry.to_dict() for name, entry in self.findings.items()}
        if self.note is not None:
            record["note"] = self.note
        return {**record, **self.extra}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Explanation:
        findings = values.get("findings")
        return cls(
            method=str(values.get("method", "")), layer=values.get("layer"),
            request=dict(values["request"]) if isinstance(values.get("request"), dict) else {},
            calls=None if values.get("calls") is None else str(values["calls"]),
            findings={str(name): FindingMap.from_dict(entry) for name, entry in findings.items()
                      if isinstance(entry, dict)} if isinstance(findings, dict) else {},
            note=None if values.get("note") is None else str(values["note"]),
            extra=_extra(values, set(cls._KEYS)),
        )


__all__ = ["Explanation", "FindingMap", "Region"]
