"""Radiomic features of one region: equal to PyRadiomics called directly, true 2D images with
their spacing, bad regions and parameter files refused with a reason."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from conftest import write_seg

from cxrtool.radiomics.features import (
    ParamsError,
    RegionError,
    as_sitk,
    default_bin_width,
    default_params,
    extract,
    load_params,
)


@pytest.fixture(scope="module")
def region():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:80]
    image = (1000 + 800 * np.exp(-((yy - 40) ** 2 + (xx - 44) ** 2) / 300) + rng.normal(0, 40, (96, 80))).astype(np.float32)
    mask = np.zeros((96, 80), np.uint8)
    mask[((yy - 40) ** 2 + (xx - 44) ** 2) < 18**2] = 1
    return image, mask


def test_features_equal_pyradiomics_called_directly(region):
    import SimpleITK as sitk
    from radiomics import featureextractor

    image, mask = region
    params = {"imageType": {"Original": {}, "LoG": {"sigma": [2.0]}},
              "featureClass": {"firstorder": None, "glcm": None, "shape2D": None},
              "setting": {"binWidth": 25.0, "label": 1}}
    ours = extract(image, mask, spacing=(0.5, 0.25), params=params)
    direct_image = sitk.GetImageFromArray(image)
    direct_image.SetSpacing((0.25, 0.5))
    direct_mask = sitk.GetImageFromArray(mask.astype(np.int32))
    direct_mask.CopyInformation(direct_image)
    direct = featureextractor.RadiomicsFeatureExtractor(params).execute(direct_image, direct_mask)
    features = [key for key in direct if not key.startswith("diagnostics_")]
    assert len(features) > 40 and any(key.startswith("log-sigma-2-0-mm") for key in features)
    for key in features:
        assert ours[key] == pytest.approx(float(direct[key]), rel=1e-9, abs=1e-12), key


def test_true_2d_images_with_spacing_give_2d_shape_in_square_millimetres(region):
    image, mask = region
    sitk_image = as_sitk(image, (0.5, 0.25))
    assert sitk_image.GetDimension() == 2 and sitk_image.GetSpacing() == (0.25, 0.5)
    features = extract(image, mask, spacing=(0.5, 0.25))  # the cxrtool 2D default
    assert features["original_shape2D_PixelSurface"] == pytest.approx(mask.sum() * 0.125)
    assert not any("shape_" in key and "shape2D" not in key for key in features)  # no 3D shape features
    assert any(key.startswith("wavelet-") for key in features) and any(key.startswith("log-sigma-1-0-mm") for key in features)
    assert features["diagnostics_Configuration_Settings"]["binWidth"] == 64.0  # 12-bit range / 64


def test_bad_regions_are_refused_with_a_reason(region):
    image, mask = region
    cases = [
        (np.dstack([image] * 3), mask, 1, "not grey"),
        (image, mask[:90], 1, "mask is 80x90 but the image is 80x96"),
        (image, np.zeros_like(mask), 1, "mask is empty"),
        (image, mask * 255, 1, "pass label 255"),
        (image, mask * 2, 1, "no pixel labelled 1; its labels are [2]"),
        (image, np.pad(np.ones((15, 1), np.uint8), ((0, 81), (40, 39))), 1, "region 1 is 1x15 pixels, a line"),
    ]
    for pixels, labels, label, reason in cases:
        with pytest.raises(RegionError, match=reason.replace("[", r"\[").replace("]", r"\]")):
            extract(pixels, labels, label=label)
    assert extract(image, mask * 255, label=255)["original_shape2D_PixelSurface"] == mask.sum()


def test_parameter_files_are_validated_by_pyradiomics_schema(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("imageType:\n  Original: {}\nfeatureClass:\n  firstorder:\nsetting:\n  binWidth: 10\n")
    assert load_params(good)["setting"]["binWidth"] == 10
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting:\n  binWidth: 10\n  binWidht: 5\n")
    with pytest.raises(ParamsError, match="binWidht"):
        load_params(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("setting: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)
    with pytest.raises(ParamsError, match="No such file"):
        load_params(tmp_path / "missing.yaml")


def test_default_bin_width_follows_the_encoding_range():
    assert default_bin_width(np.array([0.0, 0.7])) == pytest.approx(1 / 64)
    assert default_bin_width(np.array([0, 200])) == 4.0
    assert default_bin_width(np.array([0, 3000])) == 64.0
    assert default_bin_width(np.array([0, 40000])) == 1024.0
    assert default_bin_width(np.array([-1000.0, 2200.0])) == 50.0
    assert default_params(4.0)["setting"]["binWidth"] == 4.0


# ------------------------------------------------------------------ the batch loop


def _batch(tmp_path, nih_dir):
    import cv2

    from cxrtool.io.studies import read_study

    pngs = sorted((nih_dir / "images").glob("*.png"))[:3]
    rows = ["Image,Mask,Label"]
    for i, png in enumerate(pngs):
        height, width = read_study(png).shape
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : height // 2, width // 4 : width // 2] = 1
        cv2.imwrite(str(tmp_path / f"m{i}.png"), mask)
        rows.append(f"{png},m{i}.png,1")
    cv2.imwrite(str(tmp_path / "small.png"), np.ones((10, 10), np.uint8))
    cv2.imwrite(str(tmp_path / "empty.png"), np.zeros((1024, 1024), np.uint8))
    cv2.imwrite(str(tmp_path / "white.png"), cv2.imread(str(tmp_path / "m0.png"), cv2.IMREAD_UNCHANGED) * 255)
    rows += [f"{pngs[0]},small.png,1", f"{pngs[0]},empty.png,1", f"{pngs[0]},white.png,1", f"{pngs[0]},nowhere.png,1"]
    (tmp_path / "regions.csv").write_text("\n".join(rows) + "\n")
    return pngs


def test_batch_from_a_mask_csv_reports_bad_rows_and_goes_on(tmp_path, nih_dir):
    from cxrtool.radiomics.batch import measure, run_regions
    from cxrtool.radiomics.sources import jobs_from_csv

    params = {"imageType": {"Original": {}}, "featureClass": {"firstorder": None, "shape2D": None},
              "setting": {"binWidth": 0.02}}
    pngs = _batch(tmp_path, nih_dir)
    jobs = jobs_from_csv(tmp_path / "regions.csv")
    summary = run_regions(jobs, tmp_path / "out" / "radiomics.csv", params=params, workers=2)
    assert summary.total == 7 and summary.measured == 7 and summary.exit_code == 1
    with open(summary.table, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[:8] == ["image", "mask", "label", "finding", "region", "model", "status", "error"]
    assert [row["status"] for row in table] == ["ok"] * 3 + ["failed"] * 4
    reasons = [row["error"] for row in table[3:]]
    assert "mask is 10x10 but the image is 1024x1024" in reasons[0]
    assert reasons[1] == "mask is empty" and "pass label 255" in reasons[2] and "no such mask" in reasons[3]
    direct = measure(jobs[0], params)
    assert float(table[0]["original_firstorder_Mean"]) == pytest.approx(direct["original_firstorder_Mean"])
    assert table[0]["image"] == str(pngs[0]) and table[0]["diagnostics_Versions_PyRadiomics"]


def test_an_interrupted_batch_resumes_without_losing_or_repeating_rows(tmp_path, nih_dir):
    from cxrtool.radiomics.batch import run_regions
    from cxrtool.radiomics.sources import jobs_from_csv

    params = {"imageType": {"Original": {}}, "featureClass": {"firstorder": None}, "setting": {"binWidth": 0.02}}
    _batch(tmp_path, nih_dir)
    jobs = jobs_from_csv(tmp_path / "regions.csv")
    out = tmp_path / "radiomics.csv"
    journal = tmp_path / "radiomics.csv.journal.jsonl"
    # as a killed run leaves it: two rows done, the third torn mid-line
    run_regions(jobs[:3], out, params=params, workers=1)
    lines = journal.read_text().splitlines()
    assert len(lines) == 4  # the settings, then a row per region
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:50])
    summary = run_regions(jobs, out, params=params, workers=1)
    assert (summary.resumed, summary.measured, summary.total, summary.restarted) == (2, 5, 7, False)
    with open(out, newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["mask"] for row in table] == [job.mask for job in jobs]  # each once, in job order
    again = run_regions(jobs, out, params=params, workers=1)
    assert (again.measured, again.resumed, again.changed) == (1, 6, 0)  # the missing mask is looked for again
    # other settings: the table's rows are not theirs: refused, unless asked to start afresh
    from cxrtool.errors import UsageError

    with pytest.raises(UsageError, match="other settings .*classes"):
        run_regions(jobs, out, params=params, classes=("shape2D",), workers=1)
    other = run_regions(jobs, out, params=params, classes=("shape2D",), workers=1, overwrite=True)
    assert other.restarted and other.measured == 7 and other.resumed == 0
    with open(out, newline="") as handle:
        first = next(csv.DictReader(handle))
    assert "original_shape2D_PixelSurface" in first and "original_firstorder_Mean" not in first


def test_cli_from_cam_on_real_nih_images_masks_csv_and_bad_params(tmp_path, nih_dir):
    import json
    import shutil

    import torch
    from typer.testing import CliRunner

    from cxrtool.cli import app
    from cxrtool.models.checkpoint import ModelCard, save_checkpoint
    from cxrtool.models.network import CXRClassifier
    from cxrtool.preprocess import Preprocessing

    runner = CliRunner()
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "m.safetensors", CXRClassifier("resnet18", ["Effusion", "Nodule"]),
                            ModelCard("resnet18", ["Effusion", "Nodule"], Preprocessing(input_size=64).to_dict()))
    study = tmp_path / "study"
    study.mkdir()
    for png in sorted((nih_dir / "images").glob("*.png"))[:3]:
        shutil.copy(png, study / png.name)
    explained = runner.invoke(app, ["explain", str(study), "-m", str(model), "-f", "all", "--workers", "0"])
    assert explained.exit_code == 0, explained.output
    params = tmp_path / "params.yaml"
    params.write_text("imageType:\n  Original: {}\nfeatureClass:\n  firstorder:\n  shape2D:\nsetting:\n  binWidth: 0.02\n")
    # a random network's maps land anywhere: measure every region, on the chest or not
    result = runner.invoke(app, ["radiomics", str(study), "--from-cam", "--include-off-chest", "--params", str(params),
                                 "--workers", "2"])
    assert result.exit_code == 0, result.output
    with open(study / "cxrtool_radiomics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    expected = 0
    for sidecar in study.glob("*.cxrtool.json"):
        findings = json.loads(sidecar.read_text())["results"][0]["explanations"]["findings"]
        expected += sum(len(entry["regions"]) for entry in findings.values())
    assert expected > 0 and len(table) == expected
    assert {row["finding"] for row in table} <= {"Effusion", "Nodule"} and all(row["status"] == "ok" for row in table)
    # only the findings the model called positive
    positive = runner.invoke(app, ["radiomics", str(study), "--from-cam", "--include-off-chest", "--positive-only", "--params", str(params),
                                   "--out", str(tmp_path / "positive.csv")])
    assert positive.exit_code == 0, positive.output
    with open(tmp_path / "positive.csv", newline="") as handle:
        positive_rows = list(csv.DictReader(handle))
    calls = {(sidecar.name.split(".cxrtool.")[0], finding) for sidecar in study.glob("*.cxrtool.json")
             for finding, entry in json.loads(sidecar.read_text())["results"][0]["explanations"]["findings"].items()
             if entry["positive"]}
    assert {(row["image"].rsplit("/", 1)[-1], row["finding"]) for row in positive_rows} == calls
    assert calls and len(positive_rows) < len(table)
    # the same command again: every row from the journal, nothing measured twice
    again = runner.invoke(app, ["radiomics", str(study), "--from-cam", "--include-off-chest", "--params", str(params)])
    assert f"0 regions measured, {expected} from an earlier run" in again.output
    # whole images, and a parameter file that fails PyRadiomics' schema
    whole = runner.invoke(app, ["radiomics", str(study), "--params", str(params), "--out", str(tmp_path / "whole.csv")])
    assert whole.exit_code == 0 and len((tmp_path / "whole.csv").read_text().splitlines()) == 4
    wrong = runner.invoke(app, ["radiomics", str(study), "--classes", "firstorder,texture"])
    assert wrong.exit_code == 2 and "unknown feature class texture; choose from" in wrong.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("setting:\n  binWidht: 5\n")
    refused = runner.invoke(app, ["radiomics", str(study), "--params", str(bad)])
    assert refused.exit_code == 2 and "binWidht" in refused.output
    # the mask CSV path through the CLI, with a failing row: exit 1
    _batch(tmp_path, nih_dir)
    batch = runner.invoke(app, ["radiomics", "--masks", str(tmp_path / "regions.csv"), "--params", str(params)])
    assert batch.exit_code == 1 and "4 failed of 7" in batch.output


# ------------------------------------------------------------------ DICOM SEG, masks beside, colour, JSON

FAST = "imageType:\n  Original: {}\nfeatureClass:\n  firstorder:\n  shape2D:\nsetting:\n  binWidth: 8\n"


def test_dicom_seg_masks_among_the_inputs_and_in_a_mask_csv(tmp_path, dicom_dir):
    import json

    from typer.testing import CliRunner

    from cxrtool.cli import app
    from cxrtool.io.studies import StudyReadError, read_study

    rg2, rg3, other = dicom_dir / "wg04" / "RG2_UNC.dcm", dicom_dir / "wg04" / "RG3_UNC.dcm", dicom_dir / "wg04" / "RG3_RLE.dcm"
    write_seg(tmp_path / "rg2.seg.dcm", rg2, [("Nodule", (400, 500, 60, 60)), ("Mass", (900, 1000, 120, 90))])
    write_seg(tmp_path / "rg3.seg.dcm", rg3, [("Effusion", (300, 700, 80, 50))], fractional=True)
    orphan = write_seg(tmp_path / "orphan.seg.dcm", other, [("Nodule", (10, 10, 20, 20))])
    params = tmp_path / "fast.yaml"
    params.write_text(FAST)
    runner = CliRunner()
    result = runner.invoke(app, ["radiomics", str(rg2), str(rg3), str(tmp_path / "rg2.seg.dcm"), str(tmp_path / "rg3.seg.dcm"),
                                 str(orphan), "--params", str(params), "--out", str(tmp_path / "seg.csv"), "--json", "-j", "1"])
    assert result.exit_code == 0, result.output
    assert "3 regions from DICOM SEG" in result.output and "1 DICOM SEG objects reference none" in result.output
    with open(tmp_path / "seg.csv", newline="") as handle:
        table = {row["finding"]: row for row in csv.DictReader(handle)}
    assert set(table) == {"Nodule", "Mass", "Effusion"}
    assert (table["Nodule"]["label"], table["Mass"]["label"], table["Effusion"]["label"]) == ("1", "2", "1")
    spacing = read_study(rg2).pixel_spacing
    # the pixel spacing reaches PyRadiomics: the area is in mm^2
    assert float(table["Mass"]["original_shape2D_PixelSurface"]) == pytest.approx(120 * 90 * spacing[0] * spacing[1])
    assert read_study(rg3).pixel_spacing is None  # RG3 carries none: areas in pixels
    assert float(table["Effusion"]["original_shape2D_PixelSurface"]) == pytest.approx(80 * 50)
    # the same values as PyRadiomics on the same region given as a plain array
    study = read_study(rg2, keep_rescaled=True)
    plain = np.zeros(study.shape, np.uint8)
    plain[500:560, 400:460] = 1
    direct = extract(study.rescaled, plain, spacing=spacing, params=load_params(params))
    assert float(table["Nodule"]["original_firstorder_Mean"]) == pytest.approx(direct["original_firstorder_Mean"])
    document = json.loads((tmp_path / "seg.json").read_text())
    assert len(document["regions"]) == 3 and document["regions"][0]["features"]["original_firstorder_Mean"]
    assert "Versions_PyRadiomics" in document["regions"][0]["diagnostics"]
    # a mask CSV naming a SEG without a label: one row per segment; a wrong segment: a reason
    (tmp_path / "masks.csv").write_text(f"image,mask,label\n{rg2},rg2.seg.dcm,\n{rg2},rg2.seg.dcm,7\n{rg3},rg2.seg.dcm,1\n")
    result = runner.invoke(app, ["radiomics", "--masks", str(tmp_path / "masks.csv"), "--params", str(params), "-j", "1"])
    assert result.exit_code == 1
    with open(tmp_path / "cxrtool_radiomics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["finding"], row["status"]) for row in rows] == [("Nodule", "ok"), ("Mass", "ok"), ("", "failed"), ("Nodule", "failed")]
    assert "has no segment 7; its segments are 1 Nodule, 2 Mass" in rows[2]["error"]
    assert "does not reference this image" in rows[3]["error"]
    # NIfTI masks: on the image's grid they are measured; with another pixel spacing refused
    import SimpleITK as sitk

    plain_nii = sitk.GetImageFromArray(plain)
    for name, mm in (("same.nii.gz", spacing), ("other.nii.gz", (0.5, 0.5))):
        plain_nii.SetSpacing((mm[1], mm[0]))
        sitk.WriteImage(plain_nii, str(tmp_path / name))
    (tmp_path / "nifti.csv").write_text(f"image,mask\n{rg2},same.nii.gz\n{rg2},other.nii.gz\n")
    result = runner.invoke(app, ["radiomics", "--masks", str(tmp_path / "nifti.csv"), "--params", str(params), "-j", "1",
                                 "--out", str(tmp_path / "nifti_out.csv")])
    with open(tmp_path / "nifti_out.csv", newline="") as handle:
        same, other = list(csv.DictReader(handle))
    assert result.exit_code == 1 and same["status"] == "ok"
    assert float(same["original_firstorder_Mean"]) == pytest.approx(direct["original_firstorder_Mean"])
    assert "has pixel spacing 0.5 x 0.5 mm but the image 0.2 x 0.2 mm" in other["error"]
    # predict and explain do not take a SEG for a radiograph
    with pytest.raises(StudyReadError, match="Segmentation"):
        read_study(tmp_path / "rg2.seg.dcm")


def test_masks_beside_the_studies_and_colour_images(tmp_path, nih_dir):
    import shutil

    import cv2
    from typer.testing import CliRunner

    from cxrtool.cli import app

    first, second = sorted((nih_dir / "images").glob("*.png"))[:2]
    shutil.copy(first, tmp_path / "a.png")
    shutil.copy(second, tmp_path / "b.png")
    mask = np.zeros((1024, 1024), np.uint8)
    mask[300:400, 200:330] = 1
    cv2.imwrite(str(tmp_path / "a.mask.png"), mask)
    colour = cv2.applyColorMap(cv2.imread(str(first), cv2.IMREAD_GRAYSCALE), cv2.COLORMAP_JET)
    cv2.imwrite(str(tmp_path / "overlay.png"), colour)  # an overlay given by mistake
    params = tmp_path / "fast.yaml"
    params.write_text(FAST.replace("binWidth: 8", "binWidth: 0.02"))
    result = CliRunner().invoke(app, ["radiomics", str(tmp_path), "--params", str(params), "-j", "1"])
    assert result.exit_code == 1, result.output  # the colour image's row failed
    assert "0 regions from DICOM SEG, 1 from masks beside the studies, 2 whole images" in result.output
    with open(tmp_path / "cxrtool_radiomics.csv", newline="") as handle:
        rows = {row["image"].rsplit("/", 1)[-1]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"a.png", "b.png", "overlay.png"}  # the mask is not a study
    assert rows["a.png"]["mask"].endswith("a.mask.png")
    assert float(rows["a.png"]["original_shape2D_PixelSurface"]) == 100 * 130
    assert rows["b.png"]["mask"] == "" and rows["b.png"]["status"] == "ok"
    assert rows["overlay.png"]["status"] == "failed" and "image is colour" in rows["overlay.png"]["error"]
