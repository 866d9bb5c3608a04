"""What a run scores studies with: one checkpoint, or a bundle of them.

Both are a *scorer*. A scorer says which preprocessed tensors it needs of each study
(``preprocessings``: key -> :class:`~cxrtool.preprocess.Preprocessing`; the runner makes
each once per study, shared by every member that asks for the same one), and turns decoded
studies into one :class:`Scored` each: the findings it scored, their probabilities
(calibrated as the card says) and thresholds, and, for a bundle, how the study was routed
and what each member said.

:func:`open_model` is the one place a model argument (a checkpoint file or a bundle file)
becomes a scorer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cxrtool.io.decoded import DecodedStudy
from cxrtool.io.records import ModelRef
from cxrtool.models.calibration import Calibration
from cxrtool.preprocess import NO_TTA, Preprocessing, TestTimeAugmentation

BUNDLE_ARCHITECTURE = "bundle"


def prep_key(prep: Preprocessing) -> str:
    """A short name for a preprocessing: equal settings, equal key."""
    return hashlib.sha256(json.dumps(prep.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Scored:
    """One study's scores from a scorer.

    Attributes:
        findings: the findings scored (a bundle's route may score fewer than the bundle has).
        probabilities: what the calls are made on, one per finding.
        thresholds: one per finding.
        raw: the model's own probabilities when ``probabilities`` are calibrated.
        calibration: how they were calibrated, for the record.
        ensemble: a bundle's record of the study: projection (and where it came from),
            route, merge, and each member's probabilities.
    """

    findings: list[str]
    probabilities: np.ndarray
    thresholds: np.ndarray
    raw: np.ndarray | None = None
    calibration: dict[str, Any] | None = None
    ensemble: dict[str, Any] | None = None
    zero_shot: list[str] = field(default_factory=list)  # findings scored from descriptions, uncalibrated
    failure: str | None = None  # why the study cannot be scored (it fails alone)


@dataclass(frozen=True)
class ZeroShot:
    """Findings a dual-branch model never trained on, scored from their descriptions
    (CheXzero's rule: the softmax over a finding's positive and negative prompt)."""

    prompts: dict[str, dict[str, list[str]]]  # finding -> {"positive": [...], "negative": [...]}
    pairs: np.ndarray | None = None  # (Z, 2, E) unit-length prompt embeddings, once embedded

    @property
    def names(self) -> list[str]:
        return list(self.prompts)

    def embedded(self) -> ZeroShot:
        """With the prompts' embeddings (:func:`zero_shot_prompts`): done once the model
        is known to take them, so a model without a text branch is refused first."""
        return self if self.pairs is not None else zero_shot_prompts(self.prompts)

    def settings(self) -> dict[str, Any]:
        """Recorded with each result: other prompts make other scores."""
        return {"zero_shot": self.prompts}


def zero_shot_prompts(prompts: dict[str, dict[str, list[str]]]) -> ZeroShot:
    """Embed prompts once; the embeddings are cached by the encoder and the texts (under the
    cache folder's ``prompts``), so a re-run needs no encoder load.

    Raises:
        UsageError: the sentence encoder is not installed.
    """
    from cxrtool.errors import UsageError
    from cxrtool.io.outputs import atomic_write
    from cxrtool.models.runtime import cache_folder
    from cxrtool.models.text import ENCODER_NAME, TEXT_HINT, encoder_installed, prompt_pairs

    key = hashlib.sha256(json.dumps([ENCODER_NAME, prompts], sort_keys=True).encode()).hexdigest()[:24]
    cached = cache_folder() / "prompts" / f"{key}.npy"
    if cached.is_file():
        return ZeroShot(prompts, np.load(cached))
    if not encoder_installed():
        raise UsageError(f"zero-shot prompts: {TEXT_HINT}")
    pairs = prompt_pairs(prompts)
    cached.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(cached, "wb") as handle:
        np.save(handle, pairs)
    return ZeroShot(prompts, pairs)




def forward(network, tensors: list[np.ndarray], device, *, tta: TestTimeAugmentation = NO_TTA,
            background: float = 0.0, pairs: np.ndarray | None = None) -> np.ndarray:
    """Probabilities for a list of preprocessed studies, as float64 (n, findings); with
    test-time augmentation, the mean over each study's copies (one forward pass for all);
    with zero-shot prompt ``pairs`` (a dual-branch network), their scores after the
    findings', from the same pass."""
    import torch

    batch = torch.from_numpy(np.stack(tensors))
    autocast = contextlib.nullcontext()
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
        autocast = torch.autocast("cuda", dtype=torch.float16)
    with torch.inference_mode():
        if tta.active:
            batch = tta.expand(batch, background)
        with autocast:
            if pairs is None:
                logits = network(batch.contiguous(memory_format=torch.channels_last))
            else:
                output = network(batch.contiguous(memory_format=torch.channels_last), full=True)
                unseen = network.text.logits(output.projection.float(), torch.from_numpy(pairs).to(batch.device))
                logits = torch.cat([output.logits.float(), unseen], dim=1)
        probabilities = tta.merge(torch.sigmoid(logits.float()), len(tensors))
    return probabilities.cpu().numpy().astype(np.float64)


class Scorer(Protocol):
    """What the study runner needs of a model, whatever its source (a checkpoint, a bundle;
    :mod:`cxrtool.models.sources`): who it is, what it scores, how studies are prepared for
    it, and their scores."""

    ref: ModelRef  # the identity its results carry
    findings: list[str]  # in order; zero-shot findings after the trained ones
    thresholds: np.ndarray  # one per finding
    threshold_method: str
    preprocessings: dict[str, Preprocessing]  # key -> how a study becomes one of its inputs
    routes_by_projection: bool  # its scores depend on the study's projection (a views table changes them)
    bundle: Any  # the bundle it scores with, or None: one network

    def score(self, items: Sequence[DecodedStudy]) -> list[Scored]:
        """Each decoded study's scores (a study it cannot score carries its ``failure``)."""
        ...


class CheckpointScorer:
    """One cxrtool checkpoint: its network (PyTorch, or its ONNX graph) and its card."""

    routes_by_projection = False  # its scores do not depend on the study's projection
    bundle = None  # one network

    def __init__(self, path: str | os.PathLike, network, card, device, *, sha256: str, onnx=None,
                 tta: TestTimeAugmentation = NO_TTA, zero_shot: ZeroShot | None = None) -> None:
        self.path = Path(path)
        self.tta = tta
        self.zero_shot = zero_shot
        self.network = network
        self.card = card
        self.device = device
        self.onnx = onnx
        self.ref = ModelRef(card.name, card.architecture, sha256)
        self.prep = Preprocessing.from_dict(card.preprocessing)
        self.key = prep_key(self.prep)
        self.preprocessings = {self.key: self.prep}
        self.zero_shot_findings = zero_shot.names if zero_shot is not None else []
        self.findings = list(card.findings) + self.zero_shot_findings
        self.threshold_method = card.threshold_method
        # A zero-shot finding has no validation data: it is called at 0.5, and says it is uncalibrated.
        self.thresholds = np.array([card.threshold_for(f) for f in card.findings] + [0.5] * len(self.zero_shot_findings),
                                   dtype=np.float64)
        self.calibration = Calibration.from_card(card)

    def probabilities(self, tensors: list[np.ndarray]) -> np.ndarray:
        """The network's own probabilities (float64, studies x findings)."""
        import torch

        background = -self.prep.mean / self.prep.std  # a black pixel, normalised
        if self.onnx is not None:
            batch = torch.from_numpy(np.stack(tensors))
            if self.tta.active:
                batch = self.tta.expand(batch, background)
            probabilities = torch.sigmoid(torch.from_numpy(self.onnx(batch.numpy())).float())
            return self.tta.merge(probabilities, len(tensors)).numpy().astype(np.float64)
        pairs = self.zero_shot.pairs if self.zero_shot is not None else None
        return forward(self.network, tensors, self.device, tta=self.tta, background=background, pairs=pairs)

    def calibrated(self, raw: np.ndarray) -> np.ndarray:
        """The card's calibration of its own findings' probabilities (zero-shot ones as they are)."""
        if not self.calibration.active:
            return raw
        known = len(self.card.findings)
        return np.concatenate([self.calibration(raw[:, :known]), raw[:, known:]], axis=1)

    def score(self, items: Sequence[DecodedStudy]) -> list[Scored]:
        return self.score_from(self.probabilities([item.tensor(self.key) for item in items]))

    def score_from(self, raw: np.ndarray) -> list[Scored]:
        """Scores of studies from the network's own probabilities (studies x findings)."""
        calls = self.calibrated(raw)
        calibrated = self.calibration.active
        return [Scored(self.findings, row, self.thresholds, raw=raw_row if calibrated else None,
                       calibration=self.calibration.describe if calibrated else None,
                       zero_shot=self.zero_shot_findings)
                for row, raw_row in zip(calls, raw, strict=True)]


__all__ = ["BUNDLE_ARCHITECTURE", "CheckpointScorer", "Scored", "Scorer", "ZeroShot", "forward", "prep_key",
           "zero_shot_prompts"]
