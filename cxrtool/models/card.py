"""The model card: everything needed to rebuild and use a trained model, and how it came
to be; and the error a checkpoint that cannot be used raises. A leaf: the checkpoint file
format (:mod:`cxrtool.models.checkpoint`) and the network factory
(:mod:`cxrtool.models.build`) both import it."""

from __future__ import annotations

import json
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
        if values.get("format") != FORMAT:
            raise CheckpointError(f"{source}: not a cxrtool checkpoint (no '{FORMAT}' card)")
        if values.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"{source}: written by a newer cxrtool (format {values['format_version']}); upgrade cxrtool"
            )
        known = set(cls.__dataclass_fields__)
        missing = {"architecture", "findings", "preprocessing"} - set(values)
        if missing:
            raise CheckpointError(f"{source}: model card lacks {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def threshold_for(self, finding: str) -> float:
        return float(self.thresholds.get(finding, 0.5))
