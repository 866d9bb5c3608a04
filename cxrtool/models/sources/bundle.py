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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.models.checkpoint import CheckpointError, ModelCard, file_sha256, read_card
from cxrtool.registry import BUNDLE_ROUTES, DEFAULT_MERGE, ENSEMBLE_MERGES, PROJECTIONS

BUNDLE_SUFFIXES = (".yaml", ".yml")
CALIBRATION_SUFFIX = ".calibration.json"
VIEW_CLASSES = PROJECTIONS  # a view classifier's findings (`cxrtool train --task view`)
_TOP_KEYS = {"name", "merge", "members", "routes", "view_classifier", "description"}
_MEMBER_KEYS = {"path", "weight"}


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
    unknown = sorted(set(values) - _TOP_KEYS)
    if unknown:
        raise BundleError(f"{where}: unknown key {unknown[0]!r}; a bundle has {', '.join(sorted(_TOP_KEYS))}")

    merge = str(values.get("merge") or DEFAULT_MERGE)
    if merge not in ENSEMBLE_MERGES:
        raise BundleError(f"{where}: unknown merge {merge!r}; choose one of {', '.join(ENSEMBLE_MERGES)}")

    members = _read_members(values.get("members"), path, merge)
    routes = _read_routes(values.get("routes"), where, members)
    view_classifier = None
    if values.get("view_classifier") is not None:
        view_classifier = _member("view_classifier", values["view_classifier"], path, merge)
        _check_view_classifier(view_classifier, where)
    _check_coverage(routes, view_classifier, where)
    _check_shared_findings(members, where)

    bundle = Bundle(path=path, name=str(values.get("name") or path.stem), merge=merge, members=members,
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
                raise BundleError(f"{where}: merge: rank has no validation scores of member {name!r} for "
                                  f"{missing[0]} (no validation study took its route {', '.join(routes_of)}); "
                                  "calibrate on labels with studies of every route, or choose merge: mean")
    bundle.sha256 = digest(bundle)
    return bundle


def _unique_key_loader():
    """PyYAML's safe loader, refusing a key given twice (plain YAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise BundleError(f"{key!r} is given twice (lines {seen[key]} and {key_node.start_mark.line + 1}); "
                                  "give each its own name")
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def _load_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"{path}: cannot be read as a text file ({error})") from None
    try:
        return yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader
    except BundleError as error:
        raise BundleError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise BundleError(f"{path}: not valid YAML{at} ({problem})") from None


def _member(name: str, value: Any, bundle: Path, merge: str) -> BundleMember:
    where = f"{bundle}: {'the view classifier' if name == 'view_classifier' else f'member {name!r}'}"
    weight: Any = 1.0
    if isinstance(value, dict):
        unknown = sorted(set(value) - _MEMBER_KEYS)
        if unknown:
            raise BundleError(f"{where}: unknown key {unknown[0]!r}; a member has path and weight")
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
        name = str(name)
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
        route = str(route)
        if route not in BUNDLE_ROUTES:
            raise BundleError(f"{where}: unknown route {route!r}; routes are {', '.join(BUNDLE_ROUTES)}")
        if names is not None and not isinstance(names, (str, list)):
            raise BundleError(f"{where}: route {route} must name members, as a name or a list (e.g. {route}: [a, b]), "
                              f"not {names!r}")
        names = [names] if isinstance(names, str) else list(names or [])
        if len(set(map(str, names))) < len(names):
            raise BundleError(f"{where}: route {route} names a member twice; give each member once "
                              "(use merge: weighted to count one more)")
        for name in names:
            if str(name) not in members:
                raise BundleError(f"{where}: route {route} names {name!r}, which is not a member "
                                  f"(members: {', '.join(members)})")
        if names:
            routes[route] = tuple(str(name) for name in names)
        elif route == "default":
            raise BundleError(f"{where}: the default route has no member; name members for it or remove it")
        elif not values.get("default"):
            raise BundleError(f"{where}: route {route} has no member and there is no default route; "
                              f"name members for {route} or add a default route")
    unused = [name for name in members if not any(name in names for names in routes.values())]
    if unused:
        raise BundleError(f"{where}: member {unused[0]!r} is on no route; name it under a route or remove it")
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
            raise BundleError(f"{where}: member {name!r} ({', '.join(member.findings[:4])}) shares no finding with "
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


__all__ = [
    "BUNDLE_SUFFIXES",
    "VIEW_CLASSES",
    "Bundle",
    "BundleError",
    "BundleMember",
    "MemberScores",
    "calibration_path",
    "is_bundle",
    "merge",
    "percentile",
    "read_bundle",
]
