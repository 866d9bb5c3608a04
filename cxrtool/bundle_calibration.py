"""``cxrtool models calibrate BUNDLE --labels ...``: a bundle's own thresholds, chosen on
validation data, and each member's validation scores for rank merging.

The validation studies go through ``predict``'s own runner (decoding in workers, routing,
every member's probabilities recorded), their results kept in memory by an output stage
(:class:`KeepEnsembles`) instead of written. From what each member said on
the studies its routes scored come its reference scores (:func:`reference_scores`: up to
1,001 quantiles per finding), with which the bundle's merge is applied as ``predict``
applies it; the thresholds are then chosen on the merged scores against the labels, per
finding, over the studies that had that finding scored. All of it is written beside the
bundle (``NAME.calibration.json``, atomically), tied to the bundle's digest: a member
file, weight, merge, route or view classifier changed since makes the bundle refuse the
calibration until it is made again.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.models.sources.bundle import Bundle, MemberScores, calibration_path, digest, merge, read_bundle
from cxrtool.preprocess import NO_TTA, TestTimeAugmentation
from cxrtool.stages import StudyOutcome

CALIBRATION_SCHEMA = "cxrtool-bundle-calibration"
REFERENCE_POINTS = 1001  # quantiles kept of a member's validation scores of a finding


@dataclass
class BundleCalibration:
    """What ``calibrate_bundle`` chose and wrote."""

    path: Path
    thresholds: dict[str, float]
    studies: int
    per_finding: dict[str, int] = field(default_factory=dict)  # labelled studies each threshold was chosen on
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def reference_scores(values: np.ndarray) -> list[float]:
    """A member's validation scores of a finding, kept for rank merging: all of them, or
    their quantiles when there are more than :data:`REFERENCE_POINTS`."""
    values = np.sort(np.asarray(values, dtype=np.float64))
    if len(values) > REFERENCE_POINTS:
        values = np.quantile(values, np.linspace(0.0, 1.0, REFERENCE_POINTS))
    return [round(float(v), 6) for v in values]


def calibrate_bundle(
    bundle_path: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    method: str = "f1",
    views: str | os.PathLike | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    tta: TestTimeAugmentation = NO_TTA,
) -> BundleCalibration:
    """Choose a bundle's thresholds (and its members' reference scores) on labelled
    validation studies and write them beside the bundle; with ``tta``, on the scores
    ``predict --tta`` gives (the calibration records it, and predict notes a mismatch).

    Raises:
        BundleError: a bad bundle (before any study is read).
        ValueError: labels that cannot be read, or no study that could be scored.
    """
    from cxrtool.data.labels import read_labels
    from cxrtool.evaluate.metrics import choose_thresholds
    from cxrtool.io.outputs import write_json
    from cxrtool.io.records import now
    from cxrtool.predict import ScoreChunk
    from cxrtool.registry import THRESHOLD_METHODS
    from cxrtool.runner import RunOptions, run_studies

    if method not in THRESHOLD_METHODS:
        raise ValueError(f"unknown threshold method {method!r}; choose one of {', '.join(THRESHOLD_METHODS)}")
    bundle = read_bundle(bundle_path, calibrated=False)
    table = read_labels(labels, image_root=images)
    if len(table) == 0:
        raise ValueError(f"{labels}: no labelled study with its image on disk ({table.skipped} rows without one)")
    paths = [table.resolve_image(i) for i in range(len(table))]
    row_of = {os.path.normpath(os.path.abspath(p)): i for i, p in enumerate(paths)}

    # Every member's own probabilities, routed as predict routes: the plain mean needs no
    # calibration, and each result records each member's probabilities beside it. Nothing
    # is written: the results are kept in memory, in the order of the labels' rows.
    plain = dataclasses.replace(bundle, merge="mean", calibration={})
    plain.sha256 = digest(plain)
    collected = KeepEnsembles()
    options = RunOptions(overwrite=True, batch_size=batch_size, workers=workers, device=device, progress=progress,
                         views=views)
    summary = run_studies(paths, model=plain, make_processor=ScoreChunk, settings={"predict": tta.settings()},
                          options=options, make_stages=lambda context: [collected], tta=tta, writes=False)
    routed = [(row_of[os.path.normpath(os.path.abspath(path))], ensemble)
              for path, ensemble in collected.ensembles if os.path.normpath(os.path.abspath(path)) in row_of]
    if not routed:
        raise ValueError(f"none of the {len(paths)} validation studies could be scored "
                         f"({len(summary.failed)} failed; first: {summary.failed[0][1] if summary.failed else '-'})")

    reference = _references(bundle, routed)
    lookup = {(member, finding): np.asarray(values) for member, by in reference.items() for finding, values in by.items()}
    findings = bundle.findings
    scores = np.full((len(routed), len(findings)), np.nan)
    for k, (_, ensemble) in enumerate(routed):
        outputs = [MemberScores(name, list(entry["probabilities"]), np.array([list(entry["probabilities"].values())]),
                                bundle.members[name].weight)
                   for name, entry in ensemble["members"].items()]
        scores[k] = merge(findings, outputs, how=bundle.merge, references=lookup)[0]
    rows = [row for row, _ in routed]
    label_column = {name: j for j, name in enumerate(table.findings)}
    truth = np.full_like(scores, np.nan)
    for j, finding in enumerate(findings):
        if finding in label_column:
            truth[:, j] = table.targets[rows, label_column[finding]]
    truth[np.isnan(scores)] = np.nan
    chosen = choose_thresholds(truth, np.nan_to_num(scores, nan=0.0), method=method)
    labelled = {f: int(np.sum(~np.isnan(truth[:, j]))) for j, f in enumerate(findings)}
    notes = []
    for j, finding in enumerate(findings):
        # Without both classes there is nothing to choose on: the members' own thresholds stand.
        known = truth[~np.isnan(truth[:, j]), j]
        if finding not in label_column or not known.any() or known.all():
            chosen[j] = bundle.members_threshold(finding, lookup)
            why = ("not in the labels" if finding not in label_column else
                   f"{'no positive' if not known.any() else 'no negative'} among its {len(known)} labelled studies")
            notes.append(f"{finding}: {why}; the members' own threshold, {chosen[j]:.4f}")
    thresholds = {f: round(float(t), 6) for f, t in zip(findings, chosen, strict=True)}

    record = {
        "schema": CALIBRATION_SCHEMA,
        "schema_version": 1,
        "bundle": Path(bundle_path).name,
        "bundle_sha256": bundle.sha256,  # the bundle as it is now: another version refuses this calibration
        "members": {name: member.sha256 for name, member in bundle.members.items()},
        "tta": tta.settings(),
        "merge": bundle.merge,
        "threshold_method": method,
        "thresholds": thresholds,
        "reference": reference,
        "validation": {"labels": str(labels), "studies": len(routed), "labelled_per_finding": labelled,
                       "failed": len(summary.failed)},
        "created": now(),
    }
    path = calibration_path(bundle_path)
    write_json(path, record)
    return BundleCalibration(path, thresholds, len(routed), labelled, list(summary.failed), notes)


class KeepEnsembles:
    """The output stage of a calibration run: each scored study's route and member
    probabilities (the result's ``ensemble`` record), kept in memory; nothing written."""

    def __init__(self) -> None:
        self.ensembles: list[tuple[Path, dict[str, Any]]] = []

    def study(self, outcome: StudyOutcome) -> None:
        if outcome.result is not None and outcome.result.ensemble:
            self.ensembles.append((outcome.path, outcome.result.ensemble))

    def finish(self) -> list[Path]:
        return []


def _references(bundle: Bundle, routed: list[tuple[int, dict[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """Each member's reference scores per finding, over the studies its routes scored."""
    collected: dict[str, dict[str, list[float]]] = {name: {} for name in bundle.members}
    for _, ensemble in routed:
        for name, entry in ensemble["members"].items():
            for finding, value in entry["probabilities"].items():
                collected[name].setdefault(finding, []).append(float(value))
    return {name: {finding: reference_scores(np.array(values)) for finding, values in by.items()}
            for name, by in collected.items() if by}


__all__ = ["CALIBRATION_SCHEMA", "BundleCalibration", "calibrate_bundle", "reference_scores"]
