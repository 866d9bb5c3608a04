"""The model card: everything needed to rebuild and use a trained model, and how it came
to be; and the error a checkpoint that cannot be used raises. A leaf: the checkpoint file
format (:mod:`cxrtool.models.checkpoint`) and the network factory
(:mod:`cxrtool.models.build`) both import it."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

CARD_KEY = "cxrtool_card"
TREE_KEY = "cxrtool_tree"
FORMAT = "cxrtool-checkpoint"
FORMAT_VERSION = 3


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class ModelCard:
    """Everything needed to rebuild and use a trained model, and how it came to be."""

    architecture: str
    findings: list[str]
    preprocessing: dict[str, Any]
    name: str = "cxrtool-model"
    head: str = "linear"
    head_settings: dict[str, Any] = field(default_factory=dict)  # the head's constructor settings
    output_stride: int = 32
    padding: str = "zeros"  # how the convolutions pad (registry.PADDINGS)
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_method: str = "f1"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    cxrtool_version: str = ""
    created: str = ""
    # Per-finding operating points that calibrate probabilities (see models/calibration.py).
    calibration: dict[str, Any] = field(default_factory=dict)
    # Where imported weights came from (weight set, file, SHA-256, library version, licence).
    source: dict[str, Any] = field(default_factory=dict)
    # A dual-branch model's text side: the sentence encoder, its width, each finding's prompts.
    text: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        # A calibrated card needs a cxrtool that knows calibration: an older one must refuse
        # it rather than make its calls on uncalibrated probabilities.
        # Likewise a dual-branch card (its text branch's weights) needs one that knows it.
        version = 3 if self.text else (2 if self.calibration else 1)
        return json.dumps({"format": FORMAT, "format_version": version, **self.__dict__}, sort_keys=False)

    @classmethod
    def from_json(cls, text: str, *, source: str = "checkpoint") -> ModelCard:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{source}: model card is not valid JSON ({error.msg})") from error
        if not isinstance(values, dict):
            raise CheckpointError(f"{source}: the model card is {_kind(values)}, not an object")
        if values.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not a cxrtool checkpoint (no '{FORMAT}' card)")
        version = values.get("format_version", 0)
        if not _is_int(version):
            raise CheckpointError(f"{source}: the card's format_version is {_shown(version)}, not a whole number")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{source}: written by a newer cxrtool (format {version}); upgrade cxrtool")
        missing = {"architecture", "findings", "preprocessing"} - set(values)
        if missing:
            raise CheckpointError(f"{source}: model card lacks {', '.join(sorted(missing))}")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in values.items() if k in known}
        problem = _card_problem(values)
        if problem:
            raise CheckpointError(f"{source}: the model card's {problem}")
        return cls(**values)

    def threshold_for(self, finding: str) -> float:
        return float(self.thresholds.get(finding, 0.5))


# ---- the card's schema: checked once, on load, before anything is built or exported from it

_TEXT_FIELDS = ("architecture", "name", "head", "threshold_method", "padding", "cxrtool_version", "created")
_OBJECT_FIELDS = ("preprocessing", "head_settings", "training", "metrics", "calibration", "source", "text")
MAX_FINDINGS = 1000
MAX_INPUT_SIZE = 4096


def _kind(value: Any) -> str:
    return {list: "a list", type(None): "null", str: "a string", bool: "true or false"}.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _kind(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _card_problem(values: dict[str, Any]) -> str | None:
    """What is wrong with a card's fields (one line), or None."""
    for key in _TEXT_FIELDS:
        if key in values and not (isinstance(values[key], str) and len(values[key]) <= 200):
            return f"{key} is {_shown(values[key])}, not a short text"
    if not values["architecture"]:
        return "architecture is empty"
    for key in _OBJECT_FIELDS:
        if key in values and not isinstance(values[key], dict):
            return f"{key} is {_kind(values[key])}, not an object"
    findings = values["findings"]
    if not isinstance(findings, list) or not findings or len(findings) > MAX_FINDINGS:
        return f"findings must be a list of 1 to {MAX_FINDINGS} names, not {_shown(findings)}"
    if not all(isinstance(name, str) and 0 < len(name) <= 200 for name in findings):
        return "findings must all be names (short, non-empty texts)"
    if len(set(findings)) != len(findings):
        return "findings name one finding twice"
    thresholds = values.get("thresholds", {})
    if not isinstance(thresholds, dict):
        return f"thresholds are {_kind(thresholds)}, not an object"
    for finding, threshold in thresholds.items():
        if not (_is_number(threshold) and 0.0 <= threshold <= 1.0):
            return f"threshold of {_shown(finding)} is {_shown(threshold)}, not a probability"
    if "output_stride" in values and not (_is_int(values["output_stride"]) and 1 <= values["output_stride"] <= 64):
        return f"output_stride is {_shown(values['output_stride'])}, not a whole number from 1 to 64"
    prep = values["preprocessing"]
    size = prep.get("input_size", 224)
    if not (_is_int(size) and 16 <= size <= MAX_INPUT_SIZE):
        return f"preprocessing.input_size is {_shown(size)}, not a whole number from 16 to {MAX_INPUT_SIZE}"
    for key in ("mean", "std"):
        if key in prep and not _is_number(prep[key]):
            return f"preprocessing.{key} is {_shown(prep[key])}, not a number"
    if prep.get("std", 1.0) <= 0:
        return f"preprocessing.std is {_shown(prep['std'])}, not positive"
    for key in ("resize", "resample"):
        if key in prep and not isinstance(prep[key], str):
            return f"preprocessing.{key} is {_shown(prep[key])}, not a name"
    from cxrtool.preprocess import Preprocessing

    try:
        Preprocessing.from_dict(prep)
    except (TypeError, ValueError) as error:
        return f"preprocessing: {error}"
    return None
