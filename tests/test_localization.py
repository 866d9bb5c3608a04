"""Localization metrics against hand-computed IoU/IoBB values, and `evaluate --boxes`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.evaluate.localization import evaluate_localization, inside, iobb, iou

runner = CliRunner()


def test_iou_and_iobb_by_hand():
    a, b = [0, 0, 10, 10], [5, 5, 10, 10]  # overlap 5x5 = 25
    assert iou(a, b) == pytest.approx(25 / 175)
    assert iobb(a, b) == pytest.approx(25 / 100)
    small, big = [2, 2, 4, 4], [0, 0, 20, 20]  # predicted inside truth: IoBB 1, IoU 16/400
    assert iobb(small, big) == 1.0 and iou(small, big) == pytest.approx(16 / 400)
    assert iou([0, 0, 5, 5], [10, 10, 5, 5]) == 0.0 and iobb([0, 0, 0, 0], big) == 0.0
    assert inside((10, 10), [0, 0, 10, 10]) and not inside((11, 10), [0, 0, 10, 10])
    assert inside((24, 10), [0, 0, 10, 10], tolerance=15) and not inside((26, 10), [0, 0, 10, 10], tolerance=15)


def _explained_folder(folder: Path) -> Path:
    """Three explained studies with hand-placed region boxes and peaks."""
    folder.mkdir()
    studies = {
        # IoU with the true box [0,0,10,10]: 25/175 = 0.143; IoBB 0.25; peak inside
        "a.png": {"Nodule": {"regions": [{"box": [5, 5, 10, 10]}], "peak": [6, 6]}},
        # predicted box inside the true box [0,0,20,20]: IoU 0.04, IoBB 1.0; peak outside
        "b.png": {"Nodule": {"regions": [{"box": [2, 2, 4, 4]}], "peak": [30, 30]},
                  "Effusion": {"regions": [{"box": [50, 50, 10, 10]}, {"box": [0, 0, 10, 10]}], "peak": [5, 5]}},
        # explained, but not for Mass: a miss, counted as not mapped
        "c.png": {"Nodule": {"regions": [], "peak": [0, 0]}},
    }
    with open(folder / "cxrtool_predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "Nodule", "Effusion", "Mass"])
        for name in [*studies, "d.png"]:
            writer.writerow([name, 0.5, 0.5, 0.5])
    # sidecars as the first release wrote them (schema 1: one flat record): still read
    for name, findings in studies.items():
        (folder / f"{name}.cxrtool.json").write_text(json.dumps({"file": name, "sha256": "0" * 64, "findings": {},
                                                                 "explanations": {"findings": findings}}))
    (folder / "d.png.cxrtool.json").write_text(json.dumps({"file": "d.png", "sha256": "0" * 64, "findings": {}}))  # never explained
    boxes = folder / "boxes.csv"
    boxes.write_text(
        "file,finding,x,y,w,h\n"
        "a.png,Nodule,0,0,10,10\n"
        "b.png,Nodule,0,0,20,20\n"
        "b.png,Effusion,0,0,10,10\n"
        "c.png,Mass,0,0,10,10\n"
        "d.png,Mass,0,0,10,10\n"
        "elsewhere.png,Mass,0,0,10,10\n"
    )
    return folder


def test_localization_report_matches_hand_counts(tmp_path):
    folder = _explained_folder(tmp_path / "study")
    report = evaluate_localization(folder / "cxrtool_predictions.csv", folder / "boxes.csv")
    nodule, effusion, mass = report.findings["Nodule"], report.findings["Effusion"], report.findings["Mass"]
    assert (nodule.pairs, nodule.mapped, mass.pairs, mass.mapped) == (2, 2, 1, 0)
    assert nodule.pointing == 0.5 and effusion.pointing == 1.0 and mass.pointing == 0.0
    # a: IoU .143 IoBB .25; b: IoU .04 IoBB 1.0
    assert nodule.rate(nodule.iou_hits[0.1]) == 0.5 and nodule.rate(nodule.iou_hits[0.2]) == 0.0
    assert nodule.rate(nodule.iobb_hits[0.2]) == 1.0 and nodule.rate(nodule.iobb_hits[0.3]) == 0.5
    assert nodule.rate(nodule.iobb_hits[0.7]) == 0.5
    assert effusion.rate(effusion.iou_hits[0.7]) == 1.0  # the second region matches exactly
    assert report.overall.pairs == 4 and report.overall.pointing == pytest.approx(2 / 4)
    assert report.studies == 3 and report.unmatched_boxes == 2  # d.png never explained, elsewhere.png absent
    saved = json.loads((folder / "localization.json").read_text())
    assert saved["overall"]["pairs"] == 4 and saved["findings"][0]["finding"] == "Effusion"
    assert (folder / "localization.csv").read_text().splitlines()[0].startswith("finding,pairs,mapped,pointing_game,iou_0.1")
    tolerant = evaluate_localization(folder / "cxrtool_predictions.csv", folder / "boxes.csv", tolerance=15, out_dir=tmp_path / "t")
    assert tolerant.findings["Nodule"].pointing == 1.0  # (30, 30) is 10 px from [0,0,20,20]


def test_evaluate_boxes_cli_and_its_errors(tmp_path, nih_dir):
    folder = _explained_folder(tmp_path / "study")
    result = runner.invoke(app, ["evaluate", str(folder / "cxrtool_predictions.csv"), "--boxes", str(folder / "boxes.csv")])
    assert result.exit_code == 0, result.output
    assert "localization (3 explained studies;" in result.output and "count as misses" in result.output
    nothing = runner.invoke(app, ["evaluate", str(folder / "cxrtool_predictions.csv")])
    assert nothing.exit_code == 2 and "--boxes" in nothing.output
    # NIH's own box file (Infiltrate spelt as in the labels) against studies never explained
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "cxrtool_predictions.csv").write_text("file,Nodule\nx.png,0.1\n")
    result = runner.invoke(app, ["evaluate", str(bare / "cxrtool_predictions.csv"), "--boxes", str(nih_dir / "BBox_List_2017.csv.gz")])
    assert result.exit_code == 2 and "run cxrtool explain" in result.output
