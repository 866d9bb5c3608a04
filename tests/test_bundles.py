"""Bundles: reading and checking the file, routing by projection, the ensemble arithmetic."""

from __future__ import annotations

import csv
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
    ("members: {pa: pa.safetensors}\nroutes: {PA: 3, default: [pa]}\n",
     "route PA must name members, as a name or a list \\(e.g. PA: \\[a, b\\]\\), not 3"),
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


def test_a_calibration_made_for_another_version_of_the_bundle_is_refused(members):
    path = write(members, "members: {pa: pa.safetensors, ap: ap.safetensors}\n")
    bundle = read_bundle(path)
    stored = {"members": {n: m.sha256 for n, m in bundle.members.items()}, "bundle_sha256": bundle.sha256,
              "thresholds": {"Effusion": 0.3}}
    calibration_path(path).write_text(json.dumps(stored))
    calibrated = read_bundle(path)
    assert calibrated.threshold_for("Effusion") == 0.3
    assert calibrated.threshold_for("Edema") == 0.5  # not calibrated: the members' own (their cards say 0.5)
    assert calibrated.sha256 != bundle.sha256  # new thresholds, new calls: a new identity
    refused = "made for another version of bundle.yaml .* run cxrtool models calibrate bundle.yaml"
    # The bundle's own settings changed (thresholds chosen on mean scores do not fit percentiles)...
    write(members, "merge: weighted\nmembers: {pa: pa.safetensors, ap: {path: ap.safetensors, weight: 2}}\n")
    with pytest.raises(BundleError, match=refused):
        read_bundle(path)
    # ...or a member's file did.
    write(members, "members: {pa: pa.safetensors, ap: ap.safetensors}\n")
    assert read_bundle(path).threshold_for("Effusion") == 0.3
    replace_file(members, "pa.safetensors", "pa2.safetensors")
    with pytest.raises(BundleError, match=refused):
        read_bundle(path)


def test_an_uncalibrated_bundle_calls_at_its_members_own_thresholds(make_checkpoint, tmp_path):
    findings = ("Effusion", "Nodule")
    (tmp_path / "a.safetensors").symlink_to(make_checkpoint(findings, name="a", thresholds={"Effusion": 0.2}))
    (tmp_path / "b.safetensors").symlink_to(make_checkpoint(findings, name="b", thresholds={"Effusion": 0.4}))
    bundle = read_bundle(write(tmp_path, "members: {a: a.safetensors, b: b.safetensors}\n"))
    assert bundle.threshold_for("Effusion") == pytest.approx(0.3) and bundle.threshold_for("Nodule") == 0.5
    weighted = read_bundle(write(tmp_path, "merge: weighted\nmembers: {a: {path: a.safetensors, weight: 3}, "
                                           "b: b.safetensors}\n", "w.yaml"))
    assert weighted.threshold_for("Effusion") == pytest.approx(0.25)


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


def test_a_non_finite_score_has_no_rank():
    broken = MemberScores("a", ["Effusion"], np.array([[np.nan], [0.4]]))
    merged = merge(["Effusion"], [broken], how="rank", references={("a", "Effusion"): np.array([0.1, 0.3, 0.5])})
    assert np.isnan(merged[0, 0]) and merged[1, 0] == pytest.approx(2 / 3)  # NaN stays NaN: its study fails


def test_rank_needs_validation_scores_of_every_members_findings(members):
    path = write(members, "merge: rank\nmembers: {pa: pa.safetensors, lat: lateral.safetensors}\n"
                          "routes: {LATERAL: [lat], default: [pa]}\n")
    bundle = read_bundle(path, calibrated=False)
    # Calibrated on studies of which none was lateral: the lateral member has no scores to rank among.
    reference = {"pa": {f: [0.1, 0.5] for f in bundle.members["pa"].findings}}
    calibration_path(path).write_text(json.dumps({"members": {n: m.sha256 for n, m in bundle.members.items()},
                                                  "bundle_sha256": bundle.sha256, "reference": reference}))
    with pytest.raises(BundleError, match="merge: rank has no validation scores of member 'lat' for Effusion \\(no "
                                          "validation study took its route LATERAL\\)"):
        read_bundle(path)


def test_a_percentile_does_not_depend_on_the_rest_of_the_batch():
    reference = np.sort(np.random.default_rng(0).random(50))
    scores = np.array([0.1, 0.5, 0.9])
    together = percentile(scores, reference)
    alone = np.concatenate([percentile(scores[i:i + 1], reference) for i in range(3)])
    np.testing.assert_array_equal(together, alone)
    assert percentile(np.array([reference[10]]), reference)[0] == pytest.approx(10.5 / 50)  # a tie: mid-rank


# ------------------------------------------------------------------------------ predict


@pytest.fixture()
def mixed_study(tmp_path):
    """A PA, an AP and a lateral DICOM (by their ViewPosition tag) and a PNG (no projection)."""
    from conftest import write_dicom, write_png

    folder = tmp_path / "study"
    folder.mkdir()
    write_dicom(folder / "pa.dcm", view="PA")
    write_dicom(folder / "ap.dcm", view="AP")
    write_dicom(folder / "lat.dcm", view="LL")
    write_png(folder / "x.png")
    return folder


def sidecars(folder: Path) -> dict[str, dict]:
    return {path.name.split(".")[0]: json.loads(path.read_text()) for path in folder.glob("*.cxrtool.json")}


def test_predict_with_a_bundle_routes_each_study_by_its_tag_and_records_the_members(members, mixed_study):
    from cxrtool.io.outputs import FOLDER_CSV
    from cxrtool.predict import predict

    bundle = read_bundle(write(members, ROUTED))
    summary = predict([mixed_study], model=members / "bundle.yaml", workers=0, runtime="torch")
    assert (summary.predicted, summary.exit_code) == (4, 0)
    results = {name: record["results"][0] for name, record in sidecars(mixed_study).items()}
    routes = {name: result["ensemble"]["route"] for name, result in results.items()}
    assert routes == {"pa": "PA", "ap": "AP", "lat": "LATERAL", "x": "default"}
    assert results["pa"]["ensemble"]["projection"] == {"view_position": "PA", "source": "tag"}
    assert results["x"]["ensemble"]["projection"] == {"view_position": "UNKNOWN", "source": "unknown"}
    assert results["pa"]["model"]["architecture"] == "bundle" and results["pa"]["model"]["sha256"] == bundle.sha256
    # Each route scores the findings its members have, each the mean over the members that have it.
    assert list(results["lat"]["findings"]) == ["Effusion"]
    assert list(results["ap"]["findings"]) == ["Effusion", "Cardiomegaly", "Edema"]
    assert list(results["x"]["findings"]) == ["Effusion", "Nodule", "Cardiomegaly", "Edema"]
    for name, result in results.items():
        ensemble = result["ensemble"]
        assert list(ensemble["members"]) == list(bundle.routes[routes[name]])
        for finding, call in result["findings"].items():
            scored = [m["probabilities"][finding] for m in ensemble["members"].values() if finding in m["probabilities"]]
            assert call["probability"] == pytest.approx(np.mean(scored), abs=2e-6)
            assert call["threshold"] == 0.5
    # A member's probabilities in the record are its own: the member alone gives them.
    alone = predict([mixed_study / "pa.dcm"], model=members / "pa2.safetensors", workers=0, runtime="torch")
    assert alone.predicted == 1
    own = next(r for r in sidecars(mixed_study)["pa"]["results"] if r["model"]["name"] == "pa2")
    member = results["pa"]["ensemble"]["members"]["pa2"]
    assert member["model_id"] == own["model"]["id"]
    for finding, value in member["probabilities"].items():
        assert value == pytest.approx(own["findings"][finding]["probability"], abs=2e-6)
    # The folder table has the union of the findings; a route without one leaves it blank.
    with open(mixed_study / FOLDER_CSV, newline="") as handle:
        rows = {row["file"]: row for row in csv.DictReader(handle) if row["model"] == "routed"}
    assert rows["lat.dcm"]["Nodule"] == "" and rows["x.png"]["Edema"] != ""
    # Done is done; a member's file changing makes the bundle a new model.
    assert predict([mixed_study], model=members / "bundle.yaml", workers=0, runtime="torch").skipped == 4
    replace_file(members, "pa2.safetensors", "pa.safetensors")
    assert predict([mixed_study], model=members / "bundle.yaml", workers=0, runtime="torch").predicted == 4


def test_a_view_classifier_routes_studies_without_a_projection(members, mixed_study):
    from cxrtool.predict import predict

    path = write(members, "members: {pa: pa.safetensors, ap: ap.safetensors, lat: lateral.safetensors}\n"
                          "routes: {PA: [pa], AP: [ap], LATERAL: [lat]}\nview_classifier: view.safetensors\n")
    assert predict([mixed_study], model=path, workers=0, runtime="torch").predicted == 4
    predict([mixed_study / "x.png"], model=members / "view.safetensors", workers=0, runtime="torch")
    records = sidecars(mixed_study)
    views = {name: call["probability"] for name, call in
             next(r for r in records["x"]["results"] if r["model"]["name"] == "view")["findings"].items()}
    expected = max(views, key=views.get)
    bundled = next(r for r in records["x"]["results"] if r["model"]["architecture"] == "bundle")["ensemble"]
    assert bundled["projection"]["source"] == "classifier"
    assert bundled["projection"]["view_position"] == expected
    assert bundled["projection"]["probability"] == pytest.approx(views[expected], abs=2e-6)
    assert bundled["route"] == expected
    # A study whose file names its projection is not sent to the classifier.
    tagged = next(r for r in records["ap"]["results"] if r["model"]["architecture"] == "bundle")["ensemble"]
    assert tagged["projection"] == {"view_position": "AP", "source": "tag"} and tagged["route"] == "AP"


def test_a_bad_bundle_is_refused_before_any_study_is_read(members, mixed_study):
    from typer.testing import CliRunner

    from cxrtool.cli import app

    path = write(members, "members: {pa: pa.safetensors, gone: gone.safetensors}\n")
    result = CliRunner().invoke(app, ["predict", str(mixed_study), "-m", str(path), "-j", "0"])
    assert result.exit_code == 2, result.output
    assert "member 'gone': no such file" in result.output and "relative to the bundle's folder" in result.output
    assert not list(mixed_study.glob("*.cxrtool.json"))


# ------------------------------------------------------------------------------ a view classifier


@pytest.mark.slow
def test_a_view_classifier_trained_from_the_view_column_routes_studies(members, tmp_path):
    from conftest import make_generic_dataset

    from cxrtool.models.checkpoint import read_card
    from cxrtool.predict import predict
    from cxrtool.train import load_config, train

    labels = make_generic_dataset(tmp_path / "data", n=96)
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    # The projection is what the picture shows: a disk on "PA" films, none on laterals; a few
    # rows say nothing and are left out of the view classifier's training.
    for i, row in enumerate(rows):
        row["view"] = "" if i % 12 == 5 else ("PA" if row["Disk"] == "1" else "LL")
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = load_config(None, {"task": "view", "labels": str(labels), "out": str(tmp_path / "view"),
                                "architecture": "resnet18", "input_size": 32, "batch_size": 16, "epochs": 6,
                                "workers": 0, "lr": 3e-3, "loss": "bce", "val_fraction": 0.3, "device": "cpu"})
    result = train(config)
    card = read_card(result.checkpoint)
    assert card.findings == ["PA", "LATERAL"] and card.training["task"] == "view"
    assert card.training["n_images"] == 96 - 8
    assert result.best_auroc > 0.85, result.history

    (members / "view.safetensors").unlink()
    (members / "view.safetensors").symlink_to(result.checkpoint)
    bundle = write(members, "members: {pa: pa.safetensors, lat: lateral.safetensors, ap: ap.safetensors}\n"
                            "routes: {PA: [pa], LATERAL: [lat], default: [ap]}\nview_classifier: view.safetensors\n")
    images = sorted((tmp_path / "data").glob("img0[0-3]*.png"))  # PNGs: no tag says their projection
    assert predict(images, model=bundle, workers=0, runtime="torch").predicted == len(images)
    truth = {row["path"]: "PA" if row["Disk"] == "1" else "LATERAL" for row in rows}
    routed = {name: record["results"][0]["ensemble"] for name, record in sidecars(tmp_path / "data").items()}
    assert all(entry["projection"]["source"] == "classifier" for entry in routed.values())
    right = [routed[path.name.split(".")[0]]["route"] == truth[path.name] for path in images]
    assert np.mean(right) >= 0.8, routed


def test_a_view_task_needs_two_projections(tmp_path):
    from conftest import make_generic_dataset

    from cxrtool.train import load_config, train

    labels = make_generic_dataset(tmp_path / "data", n=8)  # no view column at all
    config = load_config(None, {"task": "view", "labels": str(labels), "out": str(tmp_path / "run"),
                                "architecture": "resnet18", "input_size": 32, "workers": 0, "device": "cpu"})
    with pytest.raises(ValueError, match="a view classifier needs at least two projections .* none \\(8 of 8 rows "
                                         "of unknown projection\\)"):
        train(config)
    with pytest.raises(ValueError, match="findings cannot be chosen for task view"):
        load_config(None, {"task": "view", "labels": str(labels), "findings": "Disk"}).validate()


def test_a_route_model_trains_on_its_projections_rows_only(tmp_path):
    from conftest import make_generic_dataset
    from typer.testing import CliRunner

    from cxrtool.cli import app
    from cxrtool.data.labels import read_labels
    from cxrtool.models.checkpoint import read_card
    from cxrtool.train import load_config

    labels = make_generic_dataset(tmp_path / "data", n=24)
    with open(labels, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for i, row in enumerate(rows):
        row["view"] = ("PA", "AP", "LL", "")[i % 4]
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    base = ["train", str(labels), "--arch", "resnet18", "--input-size", "32", "--epochs", "1", "-b", "8", "-j", "0",
            "--device", "cpu"]
    result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "frontal"), "--projections", "pa,AP"])
    assert result.exit_code == 0, result.output
    assert "12 images of projection PA, AP" in result.output
    card = read_card(tmp_path / "frontal" / "model.safetensors")
    assert card.training["projections"] == ["PA", "AP"] and card.training["n_images"] == 12
    refused = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "x"), "--projections", "PA", "--task", "view"])
    assert refused.exit_code == 2 and "projections cannot be chosen for task view" in refused.output
    refused = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "x"), "--projections", "OBLIQUE"])
    assert refused.exit_code == 2 and "projections must be among PA, AP, LATERAL, UNKNOWN" in refused.output
    with pytest.raises(ValueError, match="no row of projection LATERAL in the labels' view column \\(24 UNKNOWN\\)"):
        read_labels(make_generic_dataset(tmp_path / "plain", n=24)).of_projections(["LATERAL"])
    assert load_config(None, {"labels": str(labels), "projections": "PA,AP"}).projections == ["PA", "AP"]


# ------------------------------------------------------------------------------ projection from a table


def test_read_views_from_the_tables_of_the_field(tmp_path, nih_dir):
    from cxrtool.data.labels import read_views

    nih = read_views(next(nih_dir.glob("Data_Entry*.csv*")))
    assert nih.get(tmp_path / "00000001_000.png") == nih.get(tmp_path / "00000001_000.dcm") in {"PA", "AP"}
    chexpert = write(tmp_path, "Path,Sex,Frontal/Lateral,AP/PA,Edema\n"
                               "CheXpert-v1.0/train/patient1/study1/view1_frontal.jpg,F,Frontal,AP,1\n"
                               "CheXpert-v1.0/train/patient1/study1/view2_lateral.jpg,F,Lateral,,\n"
                               "CheXpert-v1.0/train/patient2/study1/view1_frontal.jpg,M,Frontal,,0\n", "chexpert.csv")
    views = read_views(chexpert)
    tree = tmp_path / "CheXpert-v1.0" / "train"
    assert views.get(tree / "patient1" / "study1" / "view1_frontal.jpg") == "AP"
    # Every frontal film has the same name: patient 2's says nothing, and takes nothing of patient 1's.
    assert views.get(tree / "patient2" / "study1" / "view1_frontal.jpg") is None
    assert views.get(tmp_path / "elsewhere" / "view1_frontal.jpg") is None  # the name alone is ambiguous
    assert views.get(tmp_path / "copy" / "patient1" / "study1" / "view2_lateral.jpg") == "LATERAL"
    mimic = write(tmp_path, "dicom_id,subject_id,study_id,ViewPosition,Rows\n"
                            "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014,10000032,50414267,PA,3056\n"
                            "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962,10000032,50414267,LATERAL,3056\n"
                            "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab,10000032,53189527,,3056\n", "mimic.csv")
    views = read_views(mimic)
    assert views.get(tmp_path / "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm") == "PA"  # by stem
    assert views.get(tmp_path / "s1" / "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg") == "LATERAL"
    assert views.get(tmp_path / "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.dcm") is None
    with pytest.raises(ValueError, match="no image and view columns"):
        read_views(write(tmp_path, "path,Effusion\na.png,1\n", "noview.csv"))


def test_a_table_gives_the_projection_a_file_does_not(members, mixed_study):
    from typer.testing import CliRunner

    from cxrtool.cli import app

    table = write(mixed_study.parent, "path,view\nx.png,AP\npa.dcm,LL\n", "views.csv")
    bundle = write(members, ROUTED)
    args = ["predict", str(mixed_study), "-m", str(bundle), "-j", "0", "--runtime", "torch", "--views", str(table)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = sidecars(mixed_study)
    assert (records["x"]["view_position"], records["x"]["view_source"]) == ("AP", "metadata")
    assert records["x"]["results"][0]["ensemble"]["projection"] == {"view_position": "AP", "source": "metadata"}
    assert records["x"]["results"][0]["ensemble"]["route"] == "AP"
    # The file's own tag wins over the table.
    assert (records["pa"]["view_position"], records["pa"]["view_source"]) == ("PA", "tag")
    assert records["pa"]["results"][0]["ensemble"]["route"] == "PA"
    # The table decides routes: another table, or none, makes the bundle's results again; the same is done.
    assert "0 predicted, 4 already done" in CliRunner().invoke(app, args).output
    assert "4 predicted" in CliRunner().invoke(app, args[:-2]).output
    assert sidecars(mixed_study)["x"]["results"][0]["ensemble"]["route"] == "default"
    assert "4 predicted" in CliRunner().invoke(app, args).output
    table.write_text("path,view\nx.png,LATERAL\n")
    assert "4 predicted" in CliRunner().invoke(app, args).output
    assert sidecars(mixed_study)["x"]["results"][0]["ensemble"]["route"] == "LATERAL"
    # A single checkpoint does not route: the table only fills in the sidecar's projection.
    single = ["predict", str(mixed_study), "-m", str(members / "pa.safetensors"), "-j", "0", "--runtime", "torch"]
    assert CliRunner().invoke(app, single).exit_code == 0
    assert "0 predicted, 4 already done" in CliRunner().invoke(app, [*single, "--views", str(table)]).output
    bad = CliRunner().invoke(app, [*single, "--views", str(mixed_study / "nope.csv")])
    assert bad.exit_code == 2 and "--views: view table not found" in bad.output


def test_evaluate_scores_a_bundles_predictions(members, mixed_study):
    from cxrtool.evaluate import evaluate
    from cxrtool.predict import predict

    bundle = write(members, ROUTED)
    predict([mixed_study], model=bundle, workers=0, runtime="torch")
    predict([mixed_study], model=members / "pa.safetensors", workers=0, runtime="torch")  # another model's rows
    labels = write(mixed_study.parent, "path,Effusion,Nodule,Cardiomegaly,Edema\n"
                                       "pa.dcm,1,0,0,0\nap.dcm,0,1,1,1\nlat.dcm,1,0,1,0\nx.png,0,1,0,1\n", "labels.csv")
    report = evaluate(mixed_study, labels, model=bundle, n_boot=0, out_dir=mixed_study.parent / "eval")
    assert report.matching["matched"] == 4, report.matching
    rows = {row.finding: row for row in report.findings}
    # Effusion was scored on every route; Nodule only where a member has it (PA and default routes).
    assert rows["Effusion"].n == 4 and rows["Nodule"].n == 2
    assert any("left out of that finding's metrics: Cardiomegaly 1, Edema 2, Nodule 2" in n for n in report.notes), \
        report.notes


# ------------------------------------------------------------------------------ calibrate


def test_calibrate_chooses_the_bundles_thresholds_and_keeps_rank_references(members, mixed_study):
    from conftest import write_png
    from typer.testing import CliRunner

    from cxrtool.cli import app
    from cxrtool.predict import predict

    rng = np.random.default_rng(1)
    names = ["pa.dcm", "ap.dcm", "lat.dcm", "x.png"]
    for i in range(8):
        write_png(mixed_study / f"v{i}.png", seed=10 + i)
        names.append(f"v{i}.png")
    lines = ["path,Effusion,Nodule,Cardiomegaly,Edema"]
    lines += [f"study/{name}," + ",".join(str(int(v)) for v in rng.random(4) < 0.5) for name in names]
    labels = write(mixed_study.parent, "\n".join(lines) + "\n", "validation.csv")
    path = write(members, ROUTED.replace("name: routed", "name: routed\nmerge: rank"))
    with pytest.raises(BundleError, match="merge: rank needs"):
        read_bundle(path)
    result = CliRunner().invoke(app, ["models", "calibrate", str(path), "--labels", str(labels), "-j", "0"])
    assert result.exit_code == 0, result.output
    assert "thresholds of 4 findings on 12 validation studies" in result.output
    stored = json.loads(calibration_path(path).read_text())
    assert stored["validation"]["labelled_per_finding"] == {"Effusion": 12, "Nodule": 10, "Cardiomegaly": 11,
                                                           "Edema": 10}
    # References: each member's scores over the studies of its routes (pa: PA and default).
    assert len(stored["reference"]["pa"]["Effusion"]) == 1 + 9
    assert len(stored["reference"]["lateral"]["Effusion"]) == 1
    bundle = read_bundle(path)
    assert bundle.threshold_for("Nodule") == stored["thresholds"]["Nodule"]
    # predict then calls at the bundle's thresholds, on percentiles among the references.
    assert predict([mixed_study], model=path, workers=0, runtime="torch").predicted == 12
    sidecar = json.loads((mixed_study / "v0.png.cxrtool.json").read_text())
    result = next(r for r in sidecar["results"] if r["model"]["name"] == "routed")
    for finding, call in result["findings"].items():
        assert call["threshold"] == stored["thresholds"][finding] and 0.0 <= call["probability"] <= 1.0
    members_said = result["ensemble"]["members"]
    pa_rank = percentile(np.array([members_said["pa"]["probabilities"]["Nodule"]]),
                         np.array(stored["reference"]["pa"]["Nodule"]))
    assert result["findings"]["Nodule"]["probability"] == pytest.approx(float(pa_rank[0]), abs=1e-6)
    # Calibrated with the TTA predict will use: recorded; predicting otherwise says so.
    assert stored["tta"] == {}
    run = ["predict", str(mixed_study / "pa.dcm"), "-m", str(path), "-j", "0", "--runtime", "torch"]
    assert "calibrated with no TTA and scores now with --tta light" in CliRunner().invoke(app, [*run, "--tta", "light"]).output
    result = CliRunner().invoke(app, ["models", "calibrate", str(path), "--labels", str(labels), "-j", "0", "--tta", "light"])
    assert result.exit_code == 0, result.output
    assert json.loads(calibration_path(path).read_text())["tta"]["tta"] == "light"
    assert "calibrated with" not in CliRunner().invoke(app, [*run, "--tta", "light", "--overwrite"]).output


def test_calibrate_refuses_a_bad_bundle_before_reading_studies(members, tmp_path):
    from typer.testing import CliRunner

    from cxrtool.cli import app

    path = write(members, "members: {pa: gone.safetensors}\n")
    labels = write(tmp_path, "path,Effusion\nnope.png,1\n", "labels.csv")
    result = CliRunner().invoke(app, ["models", "calibrate", str(path), "--labels", str(labels)])
    assert result.exit_code == 2 and "member 'pa': no such file" in result.output


def test_a_members_non_finite_output_fails_that_study_alone(members, mixed_study, monkeypatch):
    from cxrtool.models.scoring import CheckpointScorer
    from cxrtool.predict import predict

    real = CheckpointScorer.probabilities

    def broken_ap(scorer, tensors):
        scores = real(scorer, tensors)
        if scorer.card.name == "ap":
            scores[:, 0] = np.nan
        return scores

    monkeypatch.setattr(CheckpointScorer, "probabilities", broken_ap)
    summary = predict([mixed_study], model=write(members, ROUTED), workers=0, runtime="torch")
    failed = {Path(path).name: reason for path, reason in summary.failed}
    # The AP study and the unknown one (the default route has ap) fail; PA and lateral do not.
    assert set(failed) == {"ap.dcm", "x.png"} and summary.predicted == 2
    assert "not a finite number for 1 of" in failed["ap.dcm"]


def test_a_view_classifiers_non_finite_output_fails_that_study_alone(members, mixed_study, monkeypatch):
    from cxrtool.explain import ExplainSettings, explain
    from cxrtool.models.scoring import CheckpointScorer
    from cxrtool.predict import predict

    real = CheckpointScorer.probabilities

    def broken_view(scorer, tensors):
        scores = real(scorer, tensors)
        return np.full_like(scores, np.nan) if scorer.card.name == "view" else scores

    monkeypatch.setattr(CheckpointScorer, "probabilities", broken_view)
    bundle = write(members, "members: {pa: pa.safetensors, ap: ap.safetensors, lat: lateral.safetensors}\n"
                            "routes: {PA: [pa], AP: [ap], LATERAL: [lat]}\nview_classifier: view.safetensors\n")
    summary = predict([mixed_study], model=bundle, workers=0, runtime="torch")
    failed = {Path(path).name: reason for path, reason in summary.failed}
    assert list(failed) == ["x.png"] and summary.predicted == 3  # the tagged studies do not need the classifier
    assert failed["x.png"].startswith("the view classifier's output is not a finite number")
    summary = explain([mixed_study], model=bundle, workers=0, settings=ExplainSettings(findings=("Effusion",)))
    assert [Path(path).name for path, _ in summary.failed] == ["x.png"] and summary.predicted == 3


# ------------------------------------------------------------------------------ explain


def test_explain_on_a_bundle_averages_its_members_maps_on_the_studys_grid(members, mixed_study):
    from cxrtool.explain.run import ExplainSettings, explain

    bundle = write(members, ROUTED)
    settings = ExplainSettings(method="gradcam", findings=("Effusion",), map_format="npy")
    summary = explain([mixed_study], model=bundle, settings=settings, workers=0)
    assert (summary.predicted, summary.exit_code) == (4, 0)
    record = next(r for r in sidecars(mixed_study)["pa"]["results"] if r["model"]["name"] == "routed")
    entry = record["explanations"]["findings"]["Effusion"]
    assert set(entry["members"]) == {"pa", "pa2"} and record["explanations"]["layer"] == {"pa": "backbone.layer4", "pa2": "backbone.layer4"}
    averaged = np.load(mixed_study / entry["files"]["map"])
    assert averaged.shape == (48, 40)  # the DICOM's own pixel grid
    # Each member alone, scaled to its peak, then averaged: the bundle's map.
    own = []
    for name in ("pa", "pa2"):
        explain([mixed_study / "pa.dcm"], model=members / f"{name}.safetensors", settings=settings, workers=0)
        result = next(r for r in sidecars(mixed_study)["pa"]["results"] if r["model"]["name"] == name)
        alone = result["explanations"]["findings"]["Effusion"]
        if "files" not in alone:  # no evidence: a map of zeros, which counts as such in the mean
            assert alone["map_max"] == entry["members"][name] == 0.0
            own.append(np.zeros_like(averaged))
            continue
        single = np.load(mixed_study / alone["files"]["map"])
        assert float(single.max()) == pytest.approx(entry["members"][name], rel=1e-4)
        own.append(single / single.max())
    np.testing.assert_allclose(averaged, np.mean(own, axis=0), atol=1e-5)
    lateral = next(r for r in sidecars(mixed_study)["lat"]["results"] if r["model"]["name"] == "routed")
    assert set(lateral["explanations"]["findings"]["Effusion"]["members"]) == {"lateral"}


def test_explain_on_a_bundle_refuses_a_layer_and_unknown_findings(members, mixed_study):
    from cxrtool.explain.cams import ExplainUsageError
    from cxrtool.explain.run import ExplainSettings, explain

    bundle = write(members, ROUTED)
    with pytest.raises(ExplainUsageError, match="leave --layer out"):
        explain([mixed_study], model=bundle, settings=ExplainSettings(layer="layer3"), workers=0)
    with pytest.raises(ExplainUsageError, match="no finding 'Hernia'"):
        explain([mixed_study], model=bundle, settings=ExplainSettings(findings=("Hernia",)), workers=0)
    assert not list(mixed_study.glob("*.cxrtool.json"))
