"""Bundles: reading and checking the file, routing by projection, the ensemble arithmetic."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cxrtool.models.sources.bundle import (
    BundleError,
    MemberScores,
    calibration_path,
    is_bundle,
    merge,
    percentile,
    read_bundle,
)


@pytest.fixture()
def members(make_checkpoint, tmp_path):
    """Four member files in the bundle's folder, and a view classifier."""
    files = {
        "pa.safetensors": make_checkpoint(("Effusion", "Nodule", "Cardiomegaly"), name="pa"),
        "pa2.safetensors": make_checkpoint(("Effusion", "Nodule", "Cardiomegaly"), name="pa2", seed=1),
        "ap.safetensors": make_checkpoint(("Effusion", "Cardiomegaly", "Edema"), name="ap"),
        "lateral.safetensors": make_checkpoint(("Effusion",), name="lateral"),
        "view.safetensors": make_checkpoint(("PA", "AP", "LATERAL"), name="view"),
        "other.safetensors": make_checkpoint(("Hernia", "Fibrosis"), name="other"),
    }
    for name, source in files.items():
        (tmp_path / name).symlink_to(source)
    return tmp_path


def replace_file(folder: Path, name: str, source: str) -> None:
    """A member's file changes (the link goes: the shared checkpoint stays as it was)."""
    (folder / name).unlink()
    shutil.copy(folder / source, folder / name)


def write(folder: Path, text: str, name: str = "bundle.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


ROUTED = """
name: routed
members:
  pa: pa.safetensors
  pa2: pa2.safetensors
  ap: ap.safetensors
  lateral: lateral.safetensors
routes:
  PA: [pa, pa2]
  AP: [ap]
  LATERAL: lateral
  default: [pa, ap]
"""


def test_a_bundle_reads_routes_and_unions_findings(members):
    bundle = read_bundle(write(members, ROUTED))
    assert bundle.name == "routed" and bundle.merge == "mean"
    assert bundle.findings == ["Effusion", "Nodule", "Cardiomegaly", "Edema"]
    assert [m.name for m in bundle.members_of(bundle.route("PA"))] == ["pa", "pa2"]
    assert bundle.route("LATERAL") == "LATERAL" and bundle.route("AP") == "AP"
    assert bundle.route("UNKNOWN") == "default"
    assert [m.name for m in bundle.members_of("default")] == ["pa", "ap"]
    assert bundle.members["pa"].path == members / "pa.safetensors"  # relative to the bundle's folder
    assert len(bundle.sha256) == 64 and is_bundle("x/routed.YML") and not is_bundle("x.safetensors")


def test_a_route_left_out_goes_to_the_default(members):
    bundle = read_bundle(write(members, "members: {pa: pa.safetensors, ap: ap.safetensors}\n"
                                        "routes: {AP: [ap], default: [pa]}\n"))
    assert bundle.route("AP") == "AP"
    assert bundle.route("PA") == bundle.route("LATERAL") == bundle.route("UNKNOWN") == "default"
    # Without routes, every member scores every study.
    plain = read_bundle(write(members, "members: {pa: pa.safetensors, ap: ap.safetensors}\n", "plain.yaml"))
    assert plain.routes == {"default": ("pa", "ap")}


def test_the_identity_follows_the_member_files(members):
    path = write(members, ROUTED)
    first = read_bundle(path).sha256
    assert read_bundle(path).sha256 == first
    replace_file(members, "pa.safetensors", "pa2.safetensors")
    assert read_bundle(path).sha256 != first
    text = ROUTED.replace("LATERAL: lateral", "LATERAL: [lateral, pa]")
    assert read_bundle(write(members, text)).sha256 != first


@pytest.mark.parametrize(("text", "message"), [
    (ROUTED.replace("pa2.safetensors", "missing.safetensors"),
     "member 'pa2': no such file .*missing.safetensors \\(paths are relative to the bundle's folder\\)"),
    (ROUTED + "extra: 1\n", "unknown key 'extra'"),
    (ROUTED + "  extra: [pa]\n", "unknown route 'extra'"),
    (ROUTED.replace("  lateral: lateral.safetensors", "  lateral: lateral.safetensors\n  odd: other.safetensors")
     .replace("LATERAL: lateral", "LATERAL: [lateral, odd]"),
     "member 'odd' \\(Hernia, Fibrosis\\) shares no finding with the other members"),
    (ROUTED.replace("  ap: ap.safetensors", "  ap: ap.safetensors\n  pa: lateral.safetensors"),
     "'pa' is given twice \\(lines 4 and 7\\); give each its own name"),
    ("members: {pa: pa.safetensors, ap: ap.safetensors}\nroutes: {PA: [pa], AP: []}\n",
     "route AP has no member and there is no default route; name members for AP or add a default route"),
    ("members: {pa: pa.safetensors, ap: ap.safetensors, lat: lateral.safetensors}\n"
     "routes: {PA: [pa], AP: [ap], LATERAL: [lat]}\n",
     "a study of unknown projection would have no route; add a default route or a view_classifier"),
    ("members: {pa: pa.safetensors}\nroutes: {PA: [pa], Frontal: [pa]}\n",
     "unknown route 'Frontal'; routes are PA, AP, LATERAL, default"),
    ("members: {pa: pa.safetensors}\nroutes: {PA: [pa, nope], default: [pa]}\n",
     "route PA names 'nope', which is not a member \\(members: pa\\)"),
    ("members: {pa: pa.safetensors, ap: ap.safetensors}\nroutes: {default: [pa]}\n",
     "member 'ap' is on no route"),
    ("members: {pa: {path: pa.safetensors, weight: 2}}\n", "has a weight, but merge is mean; set merge: weighted"),
    ("merge: weighted\nmembers: {pa: {path: pa.safetensors, weight: -1}}\n", "weight must be a positive number"),
    ("merge: vote\nmembers: {pa: pa.safetensors}\n", "unknown merge 'vote'; choose one of mean, weighted, rank"),
    ("merge: rank\nmembers: {pa: pa.safetensors}\n", "merge: rank needs each member's validation scores; run "
     "cxrtool models calibrate bundle.yaml"),
    ("members: {pa: pa.safetensors}\nview_classifier: ap.safetensors\n",
     "the view classifier ap.safetensors scores Effusion, Cardiomegaly, Edema, not projections"),
    ("members: {pa: bundle.yaml}\n", "member 'pa': .*bundle.yaml: not a safetensors file"),
    ("members: [pa.safetensors]\n", "no members; list them under 'members:'"),
    ("members: {pa: pa.safetensors\n", "not valid YAML at line 2"),
])
def test_bad_bundles_are_refused_naming_the_file_and_the_fix(members, text, message):
    path = write(members, text)
    with pytest.raises(BundleError, match=message) as caught:
        read_bundle(path)
    assert str(caught.value).startswith(str(path))
    assert "\n" not in str(caught.value)


def test_a_missing_bundle_file(tmp_path):
    with pytest.raises(BundleError, match="no such bundle file"):
        read_bundle(tmp_path / "nope.yaml")


def test_a_view_classifier_lets_a_bundle_go_without_a_default(members):
    bundle = read_bundle(write(members, "members: {pa: pa.safetensors, ap: ap.safetensors, lat: lateral.safetensors}\n"
                                        "routes: {PA: [pa], AP: [ap], LATERAL: [lat]}\n"
                                        "view_classifier: view.safetensors\n"))
    assert bundle.view_classifier is not None and bundle.view_classifier.findings == ["PA", "AP", "LATERAL"]


def test_a_calibration_made_for_other_member_files_is_refused(members):
    path = write(members, "members: {pa: pa.safetensors, ap: ap.safetensors}\n")
    bundle = read_bundle(path)
    stored = {"members": {n: m.sha256 for n, m in bundle.members.items()}, "thresholds": {"Effusion": 0.3}}
    calibration_path(path).write_text(json.dumps(stored))
    calibrated = read_bundle(path)
    assert calibrated.threshold_for("Effusion") == 0.3 and calibrated.threshold_for("Edema") == 0.5
    assert calibrated.sha256 != bundle.sha256  # new thresholds, new calls: a new identity
    replace_file(members, "pa.safetensors", "pa2.safetensors")
    with pytest.raises(BundleError, match="made for other member files .* run cxrtool models calibrate bundle.yaml"):
        read_bundle(path)


# ------------------------------------------------------------------------------ arithmetic

FINDINGS = ["Effusion", "Nodule", "Edema"]
A = MemberScores("a", ["Effusion", "Nodule"], np.array([[0.2, 0.9], [0.6, 0.1]]), weight=3.0)
B = MemberScores("b", ["Edema", "Effusion"], np.array([[0.4, 0.6], [0.8, 0.2]]), weight=1.0)


def test_mean_averages_each_finding_over_the_members_that_have_it():
    merged = merge(FINDINGS, [A, B], how="mean")
    np.testing.assert_allclose(merged, [[0.4, 0.9, 0.4], [0.4, 0.1, 0.8]])


def test_weighted_mean_uses_the_weights():
    merged = merge(FINDINGS, [A, B], how="weighted")
    np.testing.assert_allclose(merged[:, 0], [(3 * 0.2 + 0.6) / 4, (3 * 0.6 + 0.2) / 4])
    np.testing.assert_allclose(merged[:, 1:], [[0.9, 0.4], [0.1, 0.8]])  # one member: its own value


def test_a_finding_no_member_has_is_nan():
    merged = merge(["Effusion", "Hernia"], [A], how="mean")
    np.testing.assert_allclose(merged[:, 0], [0.2, 0.6])
    assert np.isnan(merged[:, 1]).all()


def test_rank_averages_percentiles_among_each_members_own_validation_scores():
    references = {("a", "Effusion"): np.array([0.1, 0.3, 0.5, 0.7]), ("a", "Nodule"): np.array([0.5]),
                  ("b", "Effusion"): np.array([0.55, 0.65]), ("b", "Edema"): np.array([0.0, 1.0])}
    merged = merge(FINDINGS, [A, B], how="rank", references=references)
    # a's 0.2 is above 1 of 4 -> 0.25; b's 0.6 sits between its 2 -> 0.5: mean 0.375.
    assert merged[0, 0] == pytest.approx((0.25 + 0.5) / 2)
    # a's 0.6 -> 3/4; b's 0.2 -> 0.
    assert merged[1, 0] == pytest.approx(0.375)
    np.testing.assert_allclose(merged[:, 1], [1.0, 0.0])
    with pytest.raises(ValueError, match="no validation scores of Edema for member 'b'"):
        merge(FINDINGS, [A, B], how="rank", references={k: v for k, v in references.items() if k != ("b", "Edema")})


def test_a_percentile_does_not_depend_on_the_rest_of_the_batch():
    reference = np.sort(np.random.default_rng(0).random(50))
    scores = np.array([0.1, 0.5, 0.9])
    together = percentile(scores, reference)
    alone = np.concatenate([percentile(scores[i:i + 1], reference) for i in range(3)])
    np.testing.assert_array_equal(together, alone)
    assert percentile(np.array([reference[10]]), reference)[0] == pytest.approx(10.5 / 50)  # a tie: mid-rank
