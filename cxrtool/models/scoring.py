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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.io.records import ModelRef
from cxrtool.models.calibration import Calibration, operating_point_card
from cxrtool.preprocess import Preprocessing

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


@dataclass(frozen=True)
class TestTimeAugmentation:
    """Copies of each study scored with it, in the same forward passes, and averaged.

    ``mode`` is a key of ``registry.TTA_MODES``; ``flip`` adds the horizontal mirror of
    every copy. The copies are made on the model's device from the preprocessed tensor: a
    zoom or shift about the centre, the area it uncovers filled with the letterbox's
    background (black), so nothing of the study is invented.
    """

    mode: str = "none"
    flip: bool = False

    __test__ = False  # not a pytest test class, whatever its name says

    def __post_init__(self) -> None:
        from cxrtool.errors import UsageError
        from cxrtool.registry import TTA_MODES

        if self.mode not in TTA_MODES:
            raise UsageError(f"unknown --tta {self.mode!r}; choose one of {', '.join(TTA_MODES)}")

    @property
    def active(self) -> bool:
        return self.mode != "none" or self.flip

    def transforms(self) -> list[tuple[float, float, float, bool]]:
        """(zoom, shift x, shift y, mirrored) of each copy; shifts in fractions of the side."""
        base = [(1.0, 0.0, 0.0)]
        if self.mode in ("light", "strong"):
            base += [(1.1, 0.0, 0.0), (1 / 1.1, 0.0, 0.0)]
        if self.mode == "strong":
            base += [(1.0, 0.05, 0.0), (1.0, -0.05, 0.0), (1.0, 0.0, 0.05), (1.0, 0.0, -0.05)]
        copies = [(zoom, dx, dy, False) for zoom, dx, dy in base]
        return copies + [(zoom, dx, dy, True) for zoom, dx, dy, _ in copies] if self.flip else copies

    def settings(self) -> dict[str, Any]:
        """What is recorded with each result (nothing without augmentation)."""
        if not self.active:
            return {}
        return {"tta": self.mode, "flip": self.flip, "copies": len(self.transforms()),
                "merge": "mean of the copies' probabilities"}

    def merge(self, probabilities, n: int):
        """(n * copies, findings) -> (n, findings): the mean over each study's copies (as they are, without TTA)."""
        if not self.active:
            return probabilities
        return probabilities.reshape(n, -1, probabilities.shape[-1]).mean(dim=1)

    def expand(self, batch, background: float):
        """(n, C, S, S) -> (n * copies, C, S, S), each study's copies together."""
        import torch
        import torch.nn.functional as F

        copies = self.transforms()
        n = batch.shape[0]
        theta = torch.zeros(len(copies), 2, 3, dtype=batch.dtype, device=batch.device)
        for k, (zoom, dx, dy, mirrored) in enumerate(copies):
            # The sampling grid maps output to input coordinates in [-1, 1]: a zoom z reads
            # a window 1/z as wide; a shift moves the content by dx of the side (2 dx units).
            theta[k, 0, 0] = (-1.0 if mirrored else 1.0) / zoom
            theta[k, 1, 1] = 1.0 / zoom
            theta[k, 0, 2] = -2.0 * dx / zoom
            theta[k, 1, 2] = -2.0 * dy / zoom
        theta = theta.repeat(n, 1, 1)
        source = batch.repeat_interleave(len(copies), dim=0) - background
        grid = F.affine_grid(theta, list(source.shape), align_corners=False)
        return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background


NO_TTA = TestTimeAugmentation()


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


class CheckpointScorer:
    """One cxrtool checkpoint: its network (PyTorch, or its ONNX graph) and its card."""

    routes_by_projection = False  # its scores do not depend on the study's projection

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

    def score(self, items: Sequence[dict[str, Any]]) -> list[Scored]:
        return self.score_from(self.probabilities([item["tensors"][self.key] for item in items]))

    def score_from(self, raw: np.ndarray) -> list[Scored]:
        """Scores of studies from the network's own probabilities (studies x findings)."""
        calls = self.calibrated(raw)
        calibrated = self.calibration.active
        return [Scored(self.findings, row, self.thresholds, raw=raw_row if calibrated else None,
                       calibration=self.calibration.describe if calibrated else None,
                       zero_shot=self.zero_shot_findings)
                for row, raw_row in zip(calls, raw, strict=True)]


class BundleScorer:
    """A bundle (:mod:`cxrtool.models.sources.bundle`): each study routed by its projection
    (the file's, else the view classifier's) to its route's members, their probabilities
    merged per finding over the members that have it."""

    routes_by_projection = True

    def __init__(self, bundle, members: dict[str, CheckpointScorer], view_classifier: CheckpointScorer | None,
                 zero_shot: ZeroShot | None = None) -> None:
        self.bundle = bundle
        self.members = members
        self.view_classifier = view_classifier
        self.ref = ModelRef(bundle.name, BUNDLE_ARCHITECTURE, bundle.sha256)
        # Zero-shot findings come after the bundle's own, scored by its dual-branch members,
        # called at 0.5 (uncalibrated, as for one checkpoint).
        self.zero_shot_findings = zero_shot.names if zero_shot is not None else []
        self.findings = [*bundle.findings, *self.zero_shot_findings]
        self.threshold_method = "bundle calibration" if bundle.calibration.get("thresholds") else "members' cards"
        self.thresholds = np.array([bundle.threshold_for(f) for f in bundle.findings] + [0.5] * len(self.zero_shot_findings),
                                   dtype=np.float64)
        self.preprocessings: dict[str, Preprocessing] = {}
        for scorer in [*members.values(), *([view_classifier] if view_classifier else [])]:
            self.preprocessings.update(scorer.preprocessings)
        if view_classifier is not None:
            points = np.clip(view_classifier.thresholds, 1e-6, 1 - 1e-6)
            self.view_rule = Calibration(view_classifier.findings, operating_point_card(view_classifier.findings, points))
        self.references = {(member, finding): bundle.reference(member, finding)
                           for member, scorer in members.items() for finding in scorer.findings
                           if bundle.reference(member, finding) is not None}

    @property
    def zero_shot_merge(self) -> str:
        """How zero-shot findings are merged: as the bundle says, but ``rank`` (which needs
        validation scores) falls back to the mean."""
        return "mean" if self.bundle.merge == "rank" else self.bundle.merge

    def projections(self, items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Each study's projection and where it came from: the file (a DICOM tag) or a
        table's metadata as the item says, else the view classifier, else unknown."""
        found = [{"view_position": item.get("view_position", "UNKNOWN"), "source": item.get("view_source")}
                 for item in items]
        unknown = [i for i, entry in enumerate(found) if entry["view_position"] == "UNKNOWN"]
        if unknown and self.view_classifier is not None:
            classifier = self.view_classifier
            scores = classifier.calibrated(classifier.probabilities([items[i]["tensors"][classifier.key] for i in unknown]))
            # Each projection is judged against its own threshold (chosen on validation): the
            # raw probabilities of a briefly trained classifier rank well but may all lean one way.
            relative = self.view_rule(scores)
            for i, row, margin in zip(unknown, scores, relative, strict=True):
                if not np.all(np.isfinite(row)):
                    found[i] = {"view_position": "UNKNOWN", "source": "classifier", "probability": None,
                                "classifier": classifier.ref.id, "failure": "the view classifier's output is not a "
                                                                           f"finite number ({row.tolist()})"}
                    continue
                best = int(np.argmax(margin))
                found[i] = {"view_position": classifier.findings[best], "source": "classifier",
                            "probability": round(float(row[best]), 6), "classifier": classifier.ref.id}
        for entry in found:
            if entry["source"] is None:
                entry["source"] = "unknown"
        return found

    def score(self, items: Sequence[dict[str, Any]]) -> list[Scored]:
        from cxrtool.models.sources.bundle import MemberScores, merge

        projections = self.projections(items)
        routes = [self.bundle.route(p["view_position"]) for p in projections]
        scored: list[Scored | None] = [None] * len(items)
        for i, projection in enumerate(projections):
            if "failure" in projection:  # no route can be chosen: the study fails, alone
                routes[i] = None
                scored[i] = Scored([], np.zeros(0), np.zeros(0), failure=projection["failure"])
        for route in dict.fromkeys(r for r in routes if r is not None):
            rows = [i for i, r in enumerate(routes) if r == route]
            outputs = []
            for member in self.bundle.members_of(route):
                scorer = self.members[member.name]
                probabilities = scorer.calibrated(scorer.probabilities([items[i]["tensors"][scorer.key] for i in rows]))
                # Merged as recorded (6 decimals): the sidecar's member values reproduce the merge.
                probabilities = np.round(probabilities, 6)
                outputs.append(MemberScores(member.name, scorer.findings, probabilities, member.weight))
            merged = merge(self.bundle.findings, outputs, how=self.bundle.merge, references=self.references)
            if self.zero_shot_findings:
                # No validation scores exist for a zero-shot finding to rank against.
                merged = np.concatenate([merged, merge(self.zero_shot_findings, outputs, how=self.zero_shot_merge)], axis=1)
            # The route's findings: a member's non-finite output stays in them and fails the study.
            scored_here = {finding for out in outputs for finding in out.findings}
            have = np.array([j for j, finding in enumerate(self.findings) if finding in scored_here], dtype=np.int64)
            for k, i in enumerate(rows):
                ensemble = {
                    "projection": projections[i], "route": route, "merge": self.bundle.merge,
                    **({"zero_shot_merge": self.zero_shot_merge} if self.zero_shot_findings else {}),
                    "members": {out.name: {"model_id": self.members[out.name].ref.id,
                                           "probabilities": {f: round(float(p), 6) for f, p in
                                                             zip(out.findings, out.probabilities[k], strict=True)}}
                                for out in outputs},
                }
                scored[i] = Scored([self.findings[j] for j in have], merged[k, have], self.thresholds[have],
                                   ensemble=ensemble, zero_shot=[f for f in self.zero_shot_findings if f in scored_here])
        return scored  # type: ignore[return-value]


def identify(model: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """A checkpoint's or bundle's identity (the SHA-256 its results carry) and its decision
    thresholds, read without loading any weights."""
    from cxrtool.models.checkpoint import file_sha256, read_card
    from cxrtool.models.sources.bundle import is_bundle, read_bundle

    if is_bundle(model):
        bundle = read_bundle(model)
        return bundle.sha256, {f: bundle.threshold_for(f) for f in bundle.findings}
    card = read_card(model)
    return file_sha256(model), {f: card.threshold_for(f) for f in card.findings}


def open_model(model: str | os.PathLike | Any, *, device, runtime: str = "torch", note: Callable[[str], None] | None = None,
               tta: TestTimeAugmentation = NO_TTA, zero_shot: ZeroShot | None = None) -> CheckpointScorer | BundleScorer:
    """A checkpoint or a bundle (a file, or a read :class:`~cxrtool.models.sources.bundle.Bundle`),
    loaded onto ``device`` and ready to score (with
    ``tta``: each checkpoint, or each member of a bundle; a bundle's view classifier
    scores the study as it is).

    Raises:
        CheckpointError: a file that is not a usable checkpoint, or a bad bundle (its
            :class:`~cxrtool.models.sources.bundle.BundleError` names the fix).
    """
    from cxrtool.models.sources.bundle import Bundle, is_bundle, read_bundle

    if isinstance(model, Bundle) or is_bundle(model):
        bundle = model if isinstance(model, Bundle) else read_bundle(model)
        readers = _text_members(bundle, zero_shot, runtime) if zero_shot is not None else set()
        zero_shot = zero_shot.embedded() if zero_shot is not None else None  # once, for every member
        loaded: dict[tuple, CheckpointScorer] = {}  # a file named twice is loaded once

        def load(member, augment: TestTimeAugmentation, unseen: ZeroShot | None = None) -> CheckpointScorer:
            key = (member.path, augment, unseen is not None)
            if key not in loaded:
                loaded[key] = _checkpoint(member.path, device, runtime, note, sha256=member.sha256, tta=augment,
                                          zero_shot=unseen)
            return loaded[key]

        calibrated_with = bundle.calibration.get("tta", {}) if bundle.calibration else None
        if calibrated_with is not None and calibrated_with != tta.settings() and note is not None:
            def said(settings: dict) -> str:
                return f"--tta {settings['tta']}{' --tta-flip' if settings.get('flip') else ''}" if settings else "no TTA"

            note(f"{bundle.path.name} was calibrated with {said(calibrated_with)} and scores now with "
                 f"{said(tta.settings())}: its thresholds were chosen on other scores; calibrate it with the same TTA")
        members = {name: load(member, tta, zero_shot if name in readers else None) for name, member in bundle.members.items()}
        view = load(bundle.view_classifier, NO_TTA) if bundle.view_classifier is not None else None
        return BundleScorer(bundle, members, view, zero_shot=zero_shot)
    return _checkpoint(Path(model), device, runtime, note, tta=tta, zero_shot=zero_shot)


def _checkpoint(path: Path, device, runtime: str, note, *, sha256: str | None = None,
                tta: TestTimeAugmentation = NO_TTA, zero_shot: ZeroShot | None = None) -> CheckpointScorer:
    import torch

    from cxrtool.models.checkpoint import file_sha256, load_checkpoint
    from cxrtool.models.runtime import OnnxNetwork, cache_folder
    from cxrtool.models.runtime import choose as choose_runtime
    from cxrtool.models.runtime import export as export_onnx

    network, card = load_checkpoint(path, device=str(device))
    sha256 = sha256 or file_sha256(path)
    if zero_shot is not None:
        _check_zero_shot(path, card, zero_shot, runtime)
        zero_shot = zero_shot.embedded()
        runtime = "torch"  # the exported graph gives logits only; the text branch runs in PyTorch
    onnx = None
    if choose_runtime(runtime, device.type) == "onnx":
        graph = cache_folder() / "onnx"
        if note is not None and not any(graph.glob(f"{sha256[:16]}-*")):
            note(f"exporting {card.name} for ONNX Runtime, once (into {graph})")
        onnx = OnnxNetwork(export_onnx(network, Preprocessing.from_dict(card.preprocessing).input_size, sha256))
    # Channels-last convolutions are markedly faster on CPUs (oneDNN) and tensor cores.
    network = network.to(memory_format=torch.channels_last)
    return CheckpointScorer(path, network, card, device, sha256=sha256, onnx=onnx, tta=tta, zero_shot=zero_shot)


def _already_scored(names: Sequence[str], findings: Sequence[str]) -> list[str]:
    """The prompted names that are trained findings under any spelling (``Pleural
    Effusion`` is ``Effusion``; case and underscores aside)."""
    from cxrtool.registry import finding_key

    trained = {finding_key(finding) for finding in findings}
    return [name for name in names if finding_key(name) in trained]


def _text_members(bundle, zero_shot: ZeroShot, runtime: str) -> set[str]:
    """The members of a bundle that score zero-shot prompts: those with a text branch.

    Raises:
        UsageError: no member has one, or a prompt names a finding of the bundle.
    """
    from cxrtool.errors import UsageError

    trained = _already_scored(zero_shot.names, bundle.findings)
    if trained:
        raise UsageError(f"{trained[0]!r} is a finding of the bundle: its members' heads score it; "
                         "zero-shot is for findings they never saw")
    readers = {name for name, member in bundle.members.items() if member.card.text}
    if not readers:
        raise UsageError(f"{bundle.path}: zero-shot prompts need a dual-branch member (train one with --preset dual-branch); "
                         "no member of this bundle has a text branch")
    for name in readers:
        _check_zero_shot(bundle.members[name].path, bundle.members[name].card, zero_shot, runtime)
    return readers


def _check_zero_shot(path: Path, card, zero_shot: ZeroShot, runtime: str) -> None:
    from cxrtool.errors import UsageError
    from cxrtool.models.text import ENCODER_NAME

    if not card.text:
        raise UsageError(f"{path}: zero-shot prompts need a dual-branch model (train one with --preset dual-branch); "
                         "this one has no text branch")
    if card.text.get("encoder") != ENCODER_NAME:
        raise UsageError(f"{path}: its text branch was trained against {card.text.get('encoder')}, not {ENCODER_NAME}")
    if runtime == "onnx":
        raise UsageError(f"{path}: zero-shot scoring runs in PyTorch: use --runtime torch (or auto)")
    trained = _already_scored(zero_shot.names, card.findings)
    if trained:
        raise UsageError(f"{trained[0]!r} is a finding the model was trained on: its own head scores it; "
                         "zero-shot is for findings it never saw")


__all__ = ["BUNDLE_ARCHITECTURE", "NO_TTA", "BundleScorer", "CheckpointScorer", "Scored", "TestTimeAugmentation",
           "ZeroShot", "forward", "identify", "open_model", "prep_key", "zero_shot_prompts"]
