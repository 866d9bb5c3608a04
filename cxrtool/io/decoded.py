"""A study in flight: what the runner's decoding workers make of one input file, and what
the stages (``predict``, ``explain``) and the scorers read and add to it on its way to a
written result. A leaf: the runner, the chunk processors and the model layer all import it;
it imports only the records it carries.

It crosses process boundaries (a DataLoader worker hands it to the main process, or back
after processing it there), so it stays a plain, picklable dataclass; the large arrays
(``tensors``, ``display``) are dropped as soon as they are used, so what travels back is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrtool.io.records import Fingerprint, Result


@dataclass
class DecodedStudy:
    """One study decoded and preprocessed by the runner (or the reason it failed).

    Attributes:
        index: its position in the run's list of studies to do (the dataset index): the
            key to its path and output folder in :class:`cxrtool.runner.RunContext`.
        fingerprint: its file's content (SHA-256 and stat) as read; None when the file
            could not be read to fingerprint it.
        tensors: preprocessing key -> the study's model input for it (see
            ``Scorer.preprocessings``); None when it failed to decode, and once a stage
            has used them (they are dropped at once: they are the bulk of the item).
        view_position: the projection, "PA", "AP", "LATERAL" or "UNKNOWN".
        view_source: where ``view_position`` came from: "tag" (the file), "metadata" (a
            views table), or None when unknown.
        pixel_spacing: (row, column) spacing in millimetres, or None when unknown.
        identity: the file's non-identifying identity (DICOM UIDs, transfer syntax).
        image_size: the radiograph's [height, width] in pixels.
        warnings: what the decoders warned about while reading (one line each).
        geometry: preprocessing key -> the geometry taking its input grid back to the
            study's pixels; only when the run asked for pictures (``explain``), dropped
            once the study's maps are made.
        display: the radiograph as uint8 for pictures (longer side at most the run's
            ``display_size``); only when asked for, dropped once used.
        patient_id: the DICOM PatientID, only when the run asked for it.
        error: why the study failed (one line), or None.
        fatal: an output of it that could not be written (a full or read-only disk): the
            run ends once this study is handed on, with this reason (OutputError).
        result: the model's result on it, as its chunk processor made it (the output
            stages then store it: :mod:`cxrtool.stages`); None until then, or when it failed.
    """

    index: int
    fingerprint: Fingerprint | None = None
    tensors: dict[str, np.ndarray] | None = None
    view_position: str = "UNKNOWN"
    view_source: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    identity: dict[str, str] = field(default_factory=dict)
    image_size: list[int] | None = None
    warnings: list[str] = field(default_factory=list)
    geometry: dict[str, Any] | None = None
    display: np.ndarray | None = None
    patient_id: str | None = None
    error: str | None = None
    result: Result | None = None
    fatal: str | None = None

    def tensor(self, key: str) -> np.ndarray:
        """Its model input for preprocessing ``key`` (a key of ``tensors``).

        Raises:
            ValueError: it has no tensors (it failed to decode, or a stage used them already).
        """
        if self.tensors is None:
            raise ValueError(f"study {self.index} has no tensors: it failed to decode, or they were used already")
        return self.tensors[key]


__all__ = ["DecodedStudy"]
