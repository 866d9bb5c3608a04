"""Bundles: several checkpoints behind one name, routed by projection and ensembled.

A bundle is a small YAML file. Paths are relative to the bundle's own folder::

    name: cxr-lt-routed              # optional: the file's stem otherwise
    merge: weighted                  # mean (default), weighted or rank
    view_classifier: view.safetensors   # optional: scores the projection no tag or table gives
    members:
      pa-convnext: {path: pa_convnext.safetensors, weight: 2}
      pa-resnet: pa_resnet.safetensors
      ap: ap.safetensors
      lateral: lateral.safetensors
    routes:
      PA: [pa-convnext, pa-resnet]
      AP: [ap]
      LATERAL: [lateral]
      default: [pa-convnext, ap]   # any projection without a route of its own

A study takes the route of its projection (PA, AP, LATERAL), or ``default`` where that
route is not given or the projection is unknown. The members of its route score it, each
with the preprocessing of its own card, and each finding is merged over the members that
have it (:func:`merge`): the bundle's findings are the union of its members' by name.

Everything is checked when the bundle is read, before any study is: every file exists and
is a cxrtool checkpoint, every route names known members, every study has a route, members
share findings, names are unique (:class:`BundleError` names the file and the fix).

A bundle's identity (:attr:`Bundle.sha256`) is a digest of what it says and of every
member's checkpoint digest (and of its calibration, when it has one): change a member's
file and the bundle's results are no longer "already done".
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.errors import brief
from cxrtool.io.decoded import DecodedStudy
from cxrtool.io.records import ModelRef
from cxrtool.io.yamlfile import YamlFileError, read_yaml
from cxrtool.models.calibration import Calibration, operating_point_card
from cxrtool.models.checkpoint import CheckpointError, ModelCard, file_sha256, read_card
from cxrtool.models.scoring import (
    BUNDLE_ARCHITECTURE,
    NO_TTA,
    CheckpointScorer,
    Scored,
    TestTimeAugmentation,
    ZeroShot,
)
from cxrtool.models.sources import ModelSource
from cxrtool.models.sources.checkpoint import already_scored, check_zero_shot, open_checkpoint
from cxrtool.preprocess import Preprocessing
from cxrtool.registry import BUNDLE_ROUTES, DEFAULT_MERGE, ENSEMBLE_MERGES, PROJECTIONS

BUNDLE_SUFFIXES = (".yaml", ".yml")
CALIBRATION_SUFFIX = ".calibration.json"
VIEW_CLASSES = PROJECTIONS  # a view classifier's findings (`cxrtool train --task view`)
_TOP_KEYS = {"name", "merge", "members", "routes", "view_classifier", "description"}
_MEMBER_KEYS = {"path", "weight"}
MAX_NAME = 200  # characters of a bundle's or a member's name


class BundleError(CheckpointError):
    """A bundle that cannot be used; the message names the file and the fix."""


def is_bundle(path: str | os.PathLike) -> bool:
    """A model argument names a bundle (a YAML file) rather than a checkpoint."""
    return Path(path).suffix.lower() in BUNDLE_SUFFIXES


def calibration_path(bundle: str | os.PathLike) -> Path:
    """Where ``models calibrate`` keeps a bundle's thresholds: beside it, ``NAME.calibration.json``."""
    bundle = Path(bundle)
    return bundle.with_name(bundle.stem + CALIBRATION_SUFFIX)


@dataclass(frozen=True)
class BundleMember:
    """One checkpoint of a bundle."""

    name: str
    path: Path
    card: ModelCard
    sha256: str
    weight: float = 1.0

    @property
    def findings(self) -> list[str]:
        return list(self.card.findings)


@dataclass
class Bundle:
    """A read and checked bundle file (see the module's docstring)."""

    path: Path
    name: str
    merge: str
    members: dict[str, BundleMember]
    routes: dict[str, tuple[str, ...]]
    view_classifier: BundleMember | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def findings(self) -> list[str]:
        """The union of the members' findings, in the order they first appear."""
        seen: dict[str, None] = {}
        for member in self.members.values():
            seen.update(dict.fromkeys(member.findings))
        return list(seen)

    def route(self, view_position: str) -> str:
        """The route a study of this projection takes."""
        return view_position if view_position in self.routes and view_position != "default" else "default"

    def members_of(self, route: str) -> list[BundleMember]:
        return [self.members[name] for name in self.routes[route]]

    def threshold_for(self, finding: str) -> float:
        """The bundle's own threshold (``models calibrate``), else its members' (:meth:`members_threshold`)."""
        chosen = (self.calibration.get("thresholds") or {}).get(finding)
        return float(chosen) if chosen is not None else self.members_threshold(finding)

    def members_threshold(self, finding: str, references: Mapping[tuple[str, str], np.ndarray] | None = None) -> float:
        """The members' own thresholds of a finding (from their cards), merged as their
        probabilities are (``rank``: as percentiles among their validation scores); 0.5
        when that cannot be done."""
        having = [MemberScores(name, [finding], np.array([[member.card.threshold_for(finding)]]), member.weight)
                  for name, member in self.members.items() if finding in member.findings]
        if references is None:
            references = {(out.name, finding): self.reference(out.name, finding) for out in having
                          if self.reference(out.name, finding) is not None}
        try:
            value = float(merge([finding], having, how=self.merge, references=references)[0, 0])
        except ValueError:
            return 0.5
        return value if math.isfinite(value) else 0.5

    def reference(self, member: str, finding: str) -> np.ndarray | None:
        """A member's sorted validation scores of a finding (for rank merging), if calibrated."""
        values = ((self.calibration.get("reference") or {}).get(member) or {}).get(finding)
        return None if values is None else np.sort(np.asarray(values, dtype=np.float64))


# ------------------------------------------------------------------------------- reading


def read_bundle(path: str | os.PathLike, *, calibrated: bool = True) -> Bundle:
    """Read a bundle file and check it whole (members' cards included, not their weights).

    ``calibrated=False`` leaves out the calibration beside it (``models calibrate`` reads
    the bundle so, to make a new one).

    Raises:
        BundleError: anything that would make the bundle fail on some study; the message
            names the file and what to change.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise BundleError(f"{where}: no such bundle file")
    values = _load_yaml(path)
    if not isinstance(values, dict):
        raise BundleError(f"{where}: a bundle is a YAML mapping with 'members' and 'routes' (see cxrtool predict --help)")
    unknown = sorted((key for key in values if key not in _TOP_KEYS), key=str)
    if unknown:
        raise BundleError(f"{where}: unknown key {brief(unknown[0])}; a bundle has {', '.join(sorted(_TOP_KEYS))}")

    merge = values.get("merge") or DEFAULT_MERGE
    if not isinstance(merge, str) or merge not in ENSEMBLE_MERGES:
        raise BundleError(f"{where}: unknown merge {brief(merge)}; choose one of {', '.join(ENSEMBLE_MERGES)}")
    name = values.get("name") or path.stem
    if not isinstance(name, str):
        raise BundleError(f"{where}: name must be text (quote it: name: \"...\"), not {brief(name)}")
    _check_name(name, f"{where}: name")
    if values.get("description") is not None and not isinstance(values["description"], str):
        raise BundleError(f"{where}: description must be text, not {brief(values['description'])}")

    members = _read_members(values.get("members"), path, merge)
    routes = _read_routes(values.get("routes"), where, members)
    view_classifier = None
    if values.get("view_classifier") is not None:
        view_classifier = _member("view_classifier", values["view_classifier"], path, merge)
        _check_view_classifier(view_classifier, where)
    _check_coverage(routes, view_classifier, where)
    _check_shared_findings(members, where)

    bundle = Bundle(path=path, name=name, merge=merge, members=members,
                    routes=routes, view_classifier=view_classifier)
    bundle.calibration = _read_calibration(bundle) if calibrated else {}
    if calibrated and merge == "rank":
        if not bundle.calibration.get("reference"):
            raise BundleError(f"{where}: merge: rank needs each member's validation scores; run "
                              f"cxrtool models calibrate {path.name} --labels LABELS (or choose merge: mean)")
        for name, member in members.items():
            missing = [f for f in member.findings if bundle.reference(name, f) is None]
            if missing:
                routes_of = [route for route, names in routes.items() if name in names]
                raise BundleError(f"{where}: merge: rank has no validation scores of member {brief(name)} for "
                                  f"{missing[0]} (no validation study took its route {', '.join(routes_of)}); "
                                  "calibrate on labels with studies of every route, or choose merge: mean")
    bundle.sha256 = digest(bundle)
    return bundle


def _load_yaml(path: Path) -> Any:
    """The bundle's YAML, through the package's one bounded reader (no key given twice)."""
    try:
        return read_yaml(path, what="a bundle", unique_keys=True)
    except YamlFileError as error:
        raise BundleError(str(error)) from None


def _check_name(name: str, where: str) -> None:
    """A name goes into every result: one line of at most :data:`MAX_NAME` characters."""
    if not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise BundleError(f"{where} must be one line of 1 to {MAX_NAME} printable characters, not {brief(name)}")


def _member(name: str, value: Any, bundle: Path, merge: str) -> BundleMember:
    where = f"{bundle}: {'the view classifier' if name == 'view_classifier' else f'member {brief(name)}'}"
    weight: Any = 1.0
    if isinstance(value, dict):
        unknown = sorted((key for key in value if key not in _MEMBER_KEYS), key=str)
        if unknown:
            raise BundleError(f"{where}: unknown key {brief(unknown[0])}; a member has path and weight")
        if "weight" in value:
            if merge != "weighted":
                raise BundleError(f"{where}: has a weight, but merge is {merge}; set merge: weighted or drop the weight")
            weight = value["weight"]
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise BundleError(f"{where}: give the checkpoint's path (a file name, or {{path: FILE, weight: W}})")
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        weight = float("nan")
    if not (math.isfinite(weight) and weight > 0):
        raise BundleError(f"{where}: weight must be a positive number")
    file = Path(os.path.expanduser(value))
    if not file.is_absolute():
        file = bundle.parent / file
    if not file.is_file():
        raise BundleError(f"{where}: no such file {file} (paths are relative to the bundle's folder)")
    try:
        card = read_card(file)
    except CheckpointError as error:
        raise BundleError(f"{where}: {error}") from None
    return BundleMember(name=name, path=file, card=card, sha256=file_sha256(file), weight=weight)


def _read_members(values: Any, bundle: Path, merge: str) -> dict[str, BundleMember]:
    if not isinstance(values, dict) or not values:
        raise BundleError(f"{bundle}: no members; list them under 'members:' as NAME: CHECKPOINT")
    members = {}
    for name, value in values.items():
        if isinstance(name, bool) or not isinstance(name, str | int):
            raise BundleError(f"{bundle}: a member's name must be text, not {brief(name)}")
        name = str(name)
        _check_name(name, f"{bundle}: member {brief(name)}: its name")
        if name == "view_classifier" or name in BUNDLE_ROUTES:
            raise BundleError(f"{bundle}: {name!r} cannot name a member; choose another name")
        members[name] = _member(name, value, bundle, merge)
    return members


def _read_routes(values: Any, where: str, members: Mapping[str, BundleMember]) -> dict[str, tuple[str, ...]]:
    if values is None:
        values = {"default": list(members)}  # no routes: every member scores every study
    if not isinstance(values, dict):
        raise BundleError(f"{where}: 'routes' maps a projection to member names, e.g. PA: [a, b]")
    routes: dict[str, tuple[str, ...]] = {}
    for route, names in values.items():
        if not isinstance(route, str) or route not in BUNDLE_ROUTES:
            raise BundleError(f"{where}: unknown route {brief(route)}; routes are {', '.join(BUNDLE_ROUTES)}")
        if names is not None and not isinstance(names, (str, list)):
            raise BundleError(f"{where}: route {route} must name members, as a name or a list (e.g. {route}: [a, b]), "
                              f"not {brief(names)}")
        names = [names] if isinstance(names, str) else list(names or [])
        if len(set(map(str, names))) < len(names):
            raise BundleError(f"{where}: route {route} names a member twice; give each member once "
                              "(use merge: weighted to count one more)")
        for name in names:
            if not isinstance(name, str | int) or isinstance(name, bool) or str(name) not in members:
                raise BundleError(f"{where}: route {route} names {brief(name)}, which is not a member "
                                  f"(members: {brief(', '.join(members), 200, quote=False)})")
        if names:
            routes[route] = tuple(str(name) for name in names)
        elif route == "default":
            raise BundleError(f"{where}: the default route has no member; name members for it or remove it")
        elif not values.get("default"):
            raise BundleError(f"{where}: route {route} has no member and there is no default route; "
                              f"name members for {route} or add a default route")
    unused = [name for name in members if not any(name in names for names in routes.values())]
    if unused:
        raise BundleError(f"{where}: member {brief(unused[0])} is on no route; name it under a route or remove it")
    return routes


def _check_coverage(routes: Mapping[str, tuple[str, ...]], view_classifier: BundleMember | None, where: str) -> None:
    if "default" in routes:
        return
    missing = [route for route in VIEW_CLASSES if route not in routes]
    if missing:
        raise BundleError(f"{where}: a {missing[0]} study would have no route; add a {missing[0]} or a default route")
    if view_classifier is None:
        raise BundleError(f"{where}: a study of unknown projection would have no route; add a default route "
                          "or a view_classifier")


def _check_view_classifier(member: BundleMember, where: str) -> None:
    classes = set(member.findings)
    if not classes or not classes <= set(VIEW_CLASSES):
        raise BundleError(f"{where}: the view classifier {member.path.name} scores {', '.join(member.findings[:4])}, "
                          f"not projections ({', '.join(VIEW_CLASSES)}); train one with cxrtool train --task view")


def _check_shared_findings(members: Mapping[str, BundleMember], where: str) -> None:
    if len(members) < 2:
        return
    for name, member in members.items():
        others = set().union(*(set(m.findings) for n, m in members.items() if n != name))
        if not others & set(member.findings):
            raise BundleError(f"{where}: member {brief(name)} ({', '.join(member.findings[:4])}) shares no finding with "
                              "the other members; a bundle's members score common findings: remove it or "
                              "retrain it on the bundle's label set")


def _read_calibration(bundle: Bundle) -> dict[str, Any]:
    path = calibration_path(bundle.path)
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: the bundle's calibration cannot be read ({error}); run models calibrate again") from None
    # The digest covers the member files, their weights, merge, routes and view classifier.
    if not isinstance(values, dict) or values.get("bundle_sha256") != digest(bundle):
        raise BundleError(f"{path}: made for another version of {bundle.path.name} (its member files, merge, routes, "
                          f"weights or view classifier have changed since); run cxrtool models calibrate "
                          f"{bundle.path.name} --labels LABELS again, or delete it")
    return values


def digest(bundle: Bundle) -> str:
    """What makes a bundle's results: its file's settings, each member's checkpoint digest
    and weight, the view classifier's, and its calibration. (A calibration records the
    digest of the bundle it was made for, read without one, and is refused for any other.)"""
    record = {
        "merge": bundle.merge,
        "routes": {route: list(names) for route, names in sorted(bundle.routes.items())},
        "members": {name: [member.sha256, member.weight] for name, member in sorted(bundle.members.items())},
        "view_classifier": bundle.view_classifier.sha256 if bundle.view_classifier else None,
        "calibration": bundle.calibration or None,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------- merging


@dataclass(frozen=True)
class MemberScores:
    """One member's probabilities of some studies: (studies, its findings)."""

    name: str
    findings: Sequence[str]
    probabilities: np.ndarray
    weight: float = 1.0


def percentile(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each score's mid-rank percentile among sorted reference scores, in [0, 1].

    A study's percentile depends only on its own score and the reference, never on the
    other studies of its batch (so a result is the same however the run was cut).
    """
    below = np.searchsorted(reference, scores, side="left")
    at_or_below = np.searchsorted(reference, scores, side="right")
    return (below + at_or_below) / (2.0 * max(1, len(reference)))


def merge(findings: Sequence[str], members: Sequence[MemberScores], *, how: str = DEFAULT_MERGE,
          references: Mapping[tuple[str, str], np.ndarray] | None = None) -> np.ndarray:
    """Merge members' probabilities into the bundle's findings: (studies, len(findings)).

    Each finding is merged over the members that have it; NaN where none has it.

    * ``mean``: the plain mean of their probabilities.
    * ``weighted``: the mean weighted by each member's weight.
    * ``rank``: the mean of each member's percentile (:func:`percentile`) among its own
      validation scores of that finding (``references[(member, finding)]``).

    Raises:
        ValueError: an unknown ``how``, or a missing reference for ``rank``.
    """
    if how not in ENSEMBLE_MERGES:
        raise ValueError(f"unknown merge {how!r}; choose one of {', '.join(ENSEMBLE_MERGES)}")
    n = len(members[0].probabilities) if members else 0
    total = np.zeros((n, len(findings)))
    weights = np.zeros(len(findings))
    column = {name: j for j, name in enumerate(findings)}
    for member in members:
        weight = member.weight if how == "weighted" else 1.0
        for i, finding in enumerate(member.findings):
            if finding not in column:
                continue
            values = np.asarray(member.probabilities[:, i], dtype=np.float64)
            if how == "rank":
                reference = (references or {}).get((member.name, finding))
                if reference is None:
                    raise ValueError(f"no validation scores of {finding} for member {member.name!r}: "
                                     "run models calibrate on the bundle")
                # A non-finite score has no rank: it stays NaN (and fails its study).
                values = np.where(np.isfinite(values), percentile(values, reference), np.nan)
            total[:, column[finding]] += weight * values
            weights[column[finding]] += weight
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weights > 0, total / np.where(weights > 0, weights, 1.0), np.nan)


# ----------------------------------------------------------------------------- scoring


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

    def projections(self, items: Sequence[DecodedStudy]) -> list[dict[str, Any]]:
        """Each study's projection and where it came from: the file (a DICOM tag) or a
        table's metadata as the item says, else the view classifier, else unknown."""
        found = [{"view_position": item.view_position, "source": item.view_source} for item in items]
        unknown = [i for i, entry in enumerate(found) if entry["view_position"] == "UNKNOWN"]
        if unknown and self.view_classifier is not None:
            classifier = self.view_classifier
            scores = classifier.calibrated(classifier.probabilities([items[i].tensor(classifier.key) for i in unknown]))
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

    def score(self, items: Sequence[DecodedStudy]) -> list[Scored]:
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
                probabilities = scorer.calibrated(scorer.probabilities([items[i].tensor(scorer.key) for i in rows]))
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


def identify_bundle(model: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """The bundle's digest (what its results carry) and its thresholds, without loading a network."""
    bundle = read_bundle(model)
    return bundle.sha256, {f: bundle.threshold_for(f) for f in bundle.findings}


def open_bundle(model: str | os.PathLike | Bundle, *, device, runtime: str = "torch", note: Callable[[str], None] | None = None,
                tta: TestTimeAugmentation = NO_TTA, zero_shot: ZeroShot | None = None) -> BundleScorer:
    """A bundle (a file, or a read :class:`Bundle`) with its members loaded onto ``device``
    (each file once), every member scoring with ``tta`` and the view classifier the study
    as it is; zero-shot prompts go to its dual-branch members.

    Raises:
        BundleError: a bad bundle (the message names the fix).
        CheckpointError: a member that is not a usable checkpoint.
        UsageError: zero-shot prompts none of its members can score.
    """
    bundle = model if isinstance(model, Bundle) else read_bundle(model)
    readers = _text_members(bundle, zero_shot, runtime) if zero_shot is not None else set()
    zero_shot = zero_shot.embedded() if zero_shot is not None else None  # once, for every member
    loaded: dict[tuple, CheckpointScorer] = {}  # a file named twice is loaded once

    def load(member, augment: TestTimeAugmentation, unseen: ZeroShot | None = None) -> CheckpointScorer:
        key = (member.path, augment, unseen is not None)
        if key not in loaded:
            loaded[key] = open_checkpoint(member.path, device=device, runtime=runtime, note=note, sha256=member.sha256,
                                          tta=augment, zero_shot=unseen)
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


def _text_members(bundle: Bundle, zero_shot: ZeroShot, runtime: str) -> set[str]:
    """The members of a bundle that score zero-shot prompts: those with a text branch.

    Raises:
        UsageError: no member has one, or a prompt names a finding of the bundle.
    """
    from cxrtool.errors import UsageError

    trained = already_scored(zero_shot.names, bundle.findings)
    if trained:
        raise UsageError(f"{trained[0]!r} is a finding of the bundle: its members' heads score it; "
                         "zero-shot is for findings they never saw")
    readers = {name for name, member in bundle.members.items() if member.card.text}
    if not readers:
        raise UsageError(f"{bundle.path}: zero-shot prompts need a dual-branch member (train one with --preset dual-branch); "
                         "no member of this bundle has a text branch")
    for name in readers:
        check_zero_shot(bundle.members[name].path, bundle.members[name].card, zero_shot, runtime)
    return readers


SOURCE = ModelSource(
    name="bundle",
    description="a bundle (.yaml): projection routes, ensembles, a view classifier, its calibration",
    matches=lambda model: isinstance(model, Bundle) or (isinstance(model, str | os.PathLike) and is_bundle(model)),
    identify=identify_bundle,
    open=open_bundle,
)


__all__ = [
    "BUNDLE_SUFFIXES",
    "VIEW_CLASSES",
    "Bundle",
    "BundleError",
    "BundleMember",
    "BundleScorer",
    "MemberScores",
    "calibration_path",
    "identify_bundle",
    "is_bundle",
    "merge",
    "open_bundle",
    "percentile",
    "read_bundle",
]
