"""Calibrated probabilities: a model's own probability mapped so that its operating point
for each finding becomes 0.5 (TorchXRayVision's ``op_norm``).

A probability ``p`` below the operating point ``t`` maps to ``p / (2t)``, one above it to
``1 - (1 - p) / (2(1 - t))``: monotonic per finding (AUROC unchanged), and a call at 0.5 on
the calibrated value is the call at ``t`` on the raw one. The card records the points
(``calibration``); a card without them leaves probabilities as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

XRV_OPERATING_POINTS = "xrv_operating_points"


def operating_point_card(findings: Sequence[str], points: Sequence[float]) -> dict[str, Any]:
    """The card's ``calibration`` for per-finding operating points."""
    return {"method": XRV_OPERATING_POINTS,
            "operating_points": {name: float(point) for name, point in zip(findings, points, strict=True)},
            "positive_when": "calibrated probability >= 0.5 (the raw probability at or above the operating point)"}


class Calibration:
    """Maps raw probabilities (n, findings) to calibrated ones, as a card says."""

    def __init__(self, findings: Sequence[str], calibration: Mapping[str, Any] | None) -> None:
        self.method = (calibration or {}).get("method")
        self.describe: dict[str, Any] | None = None
        self.points: np.ndarray | None = None
        if self.method is None:
            return
        if self.method != XRV_OPERATING_POINTS:
            raise ValueError(f"unknown calibration {self.method!r} in the model card; upgrade cxrtool")
        points = calibration["operating_points"]  # type: ignore[index]
        missing = [name for name in findings if name not in points]
        if missing:
            raise ValueError(f"the card's calibration has no operating point for {', '.join(missing)}")
        self.points = np.array([float(points[name]) for name in findings], dtype=np.float64)
        if not np.all((self.points > 0) & (self.points < 1)):
            raise ValueError("operating points must lie strictly between 0 and 1")
        self.describe = {"method": self.method, "positive_when": calibration.get("positive_when", "")}  # type: ignore[union-attr]

    @classmethod
    def from_card(cls, card: Any) -> Calibration:
        return cls(card.findings, getattr(card, "calibration", None))

    @property
    def active(self) -> bool:
        return self.points is not None

    def __call__(self, probabilities: np.ndarray) -> np.ndarray:
        if self.points is None:
            return probabilities
        p = np.asarray(probabilities, dtype=np.float64)
        t = self.points
        with np.errstate(invalid="ignore"):  # NaN stays NaN (and fails its study later)
            return np.where(p < t, p / (2 * t), 1.0 - (1.0 - p) / (2 * (1.0 - t)))
