"""``cxrtool explain --dicom seg``: a DICOM Segmentation of explain's regions (a segment per
finding with regions) in each DICOM study, listed in the result; none for a PNG or a study
without regions (one warning); read back with highdicom and cxrtool's own SEG reader;
checked with dciodvfy where it is installed; refused by predict (no maps)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_valid_dicom, write_png
from typer.testing import CliRunner

from cxrtool import __version__
from cxrtool.cli import app

pytest.importorskip("highdicom", reason="the DICOM SEG needs highdicom (in the test extra)")

FINDINGS = ("Effusion", "Nodule", "Cardiomegaly")
ASKED = ("Effusion", "Nodule")  # -f Effusion -f Nodule
# Small real radiographs: WG04's RG3 (CR, JPEG lossy, 1760 x 1760, no pixel spacing) and
# SIIM's (CR as Secondary Capture, JPEG baseline, 1024 x 1024, Pixel Spacing 0.168 mm).
SOURCES = ("wg04/RG3_JPLY.dcm", "siim/cxr_pa_jpeg_baseline.dcm")
runner = CliRunner()


def records_of(output: str) -> dict[str, dict]:
    return {record["file"]: record for record in (json.loads(line) for line in output.splitlines() if line.startswith("{"))}


def stored_result(study: Path, name: str) -> dict:
    (result,) = json.loads((study / f"{name}.cxrtool.json").read_text())["results"]
    return result


def seg_path(study: Path, name: str) -> Path:
    result = stored_result(study, name)
    (listed,) = result["outputs"]["seg"]
    assert listed == f"{name}.cxrtool.{result['model']['id']}.seg.dcm"
    return study / listed


def mask_of(study: Path, name: str, finding: str) -> np.ndarray:
    """explain's mask PNG of a finding, binarised (any region)."""
    import cv2

    entry = stored_result(study, name)["explanations"]["findings"][finding]
    return cv2.imread(str(study / entry["files"]["mask"]), cv2.IMREAD_UNCHANGED) > 0


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint) -> Path:
    # Effusion is always called present (threshold 0); Nodule at 0.5.
    return make_checkpoint(FINDINGS, name="tiny", thresholds={"Effusion": 0.0})


@pytest.fixture(scope="module")
def run(dicom_dir, checkpoint, tmp_path_factory):
    """One run of ``explain --dicom sr,seg --jsonl -f Effusion -f Nodule`` over two real DICOMs
    and a PNG (copies in a temporary folder: the SEG goes beside its study)."""
    study = tmp_path_factory.mktemp("seg") / "study"
    study.mkdir()
    for name in SOURCES:
        shutil.copyfile(dicom_dir / name, study / Path(name).name)
    write_png(study / "a.png")
    result = runner.invoke(app, ["explain", str(study), "-m", str(checkpoint), "-j", "0", "-f", "Effusion", "-f", "Nodule",
                                 "--dicom", "sr,seg", "--jsonl"])
    assert result.exit_code == 0, result.output
    return study, result


def test_each_dicom_study_gets_a_seg_of_its_regions_listed_in_the_result(run):
    import highdicom as hd
    import pydicom
    from pydicom.uid import SegmentationStorage

    from cxrtool.io.seg import read_seg

    study, result = run
    for name in (Path(source).name for source in SOURCES):
        stored = stored_result(study, name)
        explained = stored["explanations"]["findings"]
        assert list(explained) == list(ASKED) and all(explained[f]["regions"] for f in ASKED)  # maps with regions
        path = seg_path(study, name)
        source = pydicom.dcmread(study / name, stop_before_pixels=True)
        seg = pydicom.dcmread(path)
        assert seg.SOPClassUID == SegmentationStorage and seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
        # The same study, a new series, on the source's grid, the source referenced by each frame.
        assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.SeriesInstanceUID != source.SeriesInstanceUID
        assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns) and seg.NumberOfFrames == len(ASKED)
        assert [item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence] \
            == [source.SOPInstanceUID]
        for frame in seg.PerFrameFunctionalGroupsSequence:
            (derivation,) = frame.DerivationImageSequence
            assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert seg.PatientID == source.PatientID and seg.PatientName == source.PatientName
        assert "PatientAge" not in seg  # nothing of the source beyond its Patient and General Study modules
        # One segment per finding with regions: its code, the model as the algorithm.
        segments = seg.SegmentSequence
        assert [item.SegmentLabel for item in segments] == list(ASKED)
        assert [(item.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                 item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator) for item in segments] \
            == [("60046008", "SCT"), ("27925004", "SCT")]
        for item in segments:
            category = item.SegmentedPropertyCategoryCodeSequence[0]
            assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) \
                == ("49755003", "SCT", "Morphologically Abnormal Structure")
            assert item.SegmentAlgorithmType == "AUTOMATIC"
            (algorithm,) = item.SegmentationAlgorithmIdentificationSequence
            assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("tiny", __version__)
            assert f"model id={stored['model']['id']}" in algorithm.AlgorithmParameters
            assert "not an outline of the finding" in item.SegmentDescription
        # The segments and the SR's measurement groups track the same findings (Tracking UID).
        report = hd.sr.srread(study / stored["outputs"]["sr"][0])
        tracked = {group.tracking_identifier: group.tracking_uid for group in report.content.get_image_measurement_groups()}
        assert {item.TrackingID: item.TrackingUID for item in segments} == {f: tracked[f] for f in ASKED}
        # The masks read back equal explain's, binarised, each finding's in its segment.
        back = read_seg(path)  # cxrtool's reader (cxrtool radiomics takes SEGs with it)
        for number, finding in enumerate(ASKED, start=1):
            assert np.array_equal(back.mask(number, source.SOPInstanceUID) > 0, mask_of(study, name, finding))
        assert records_of(result.stdout)[name]["status"] == "predicted" and "warnings" not in records_of(result.stdout)[name]


def test_highdicom_reads_the_seg_back_and_pixel_measures_are_the_sources(run):
    import highdicom as hd
    import pydicom

    study, _ = run
    rg3 = seg_path(study, "RG3_JPLY.dcm")  # no pixel spacing: no Pixel Measures
    source = pydicom.dcmread(study / "RG3_JPLY.dcm", stop_before_pixels=True)
    seg = hd.seg.segread(rg3)
    assert seg.get_segment_numbers() == [1, 2]
    assert [seg.get_segment_description(n).segment_label for n in (1, 2)] == list(ASKED)
    assert seg.get_source_image_uids() == [(source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID)]
    pixels = seg.get_pixels_by_source_instance([source.SOPInstanceUID])
    assert pixels.shape == (1, source.Rows, source.Columns, 2)
    for number, finding in enumerate(ASKED):
        assert np.array_equal(pixels[0, ..., number] > 0, mask_of(study, "RG3_JPLY.dcm", finding))
    # SIIM's Pixel Spacing goes into the SEG's Pixel Measures (no Frame of Reference: no Slice
    # Thickness, which highdicom 0.28's reader wants, though the standard does not here).
    siim = pydicom.dcmread(seg_path(study, "cxr_pa_jpeg_baseline.dcm"), stop_before_pixels=True)
    (measures,) = siim.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
    assert [float(v) for v in measures.PixelSpacing] == [0.168, 0.168]
    assert "PixelMeasuresSequence" not in pydicom.dcmread(rg3, stop_before_pixels=True).SharedFunctionalGroupsSequence[0]


def test_the_sr_of_explain_gives_each_region_as_a_planar_roi_outlined_on_the_image(run):
    """explain --dicom sr: after each finding's group, a TID 1410 group per region of its map:
    the region's outline as a closed polyline on the source image (filled, it is explain's
    mask region), its area and the map's level in it; dciodvfy finds no error."""
    import cv2
    import highdicom as hd
    import pydicom

    study, _ = run
    for name in (Path(source).name for source in SOURCES):
        stored = stored_result(study, name)
        source = pydicom.dcmread(study / name, stop_before_pixels=True)
        path = study / stored["outputs"]["sr"][0]
        assert_valid_dicom(path, "ComprehensiveSR")
        report = hd.sr.srread(path)
        groups = report.content.get_planar_roi_measurement_groups()
        expected = [(finding, region) for finding in ASKED
                    for region in stored["explanations"]["findings"][finding]["regions"]]
        assert [group.tracking_identifier for group in groups] == [f"{f} region {r['label']}" for f, r in expected]
        assert len({group.tracking_uid for group in groups}) == len(groups)
        for group, (finding, region) in zip(groups, expected, strict=True):
            assert group.finding_type.meaning == {"Effusion": "Pleural effusion", "Nodule": "Nodule"}[finding]
            roi = group.roi
            assert roi.GraphicType == "POLYLINE"
            assert roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            points = np.asarray(roi.GraphicData, dtype=float).reshape(-1, 2)
            assert np.array_equal(points[0], points[-1])  # closed
            label = cv2.imread(str(study / stored["explanations"]["findings"][finding]["files"]["mask"]),
                               cv2.IMREAD_UNCHANGED) == region["label"]
            filled = np.zeros(label.shape, np.uint8)
            cv2.fillPoly(filled, [np.round(points - 0.5).astype(np.int32)], 1)  # back to pixel centres
            overlap = (filled.astype(bool) & label).sum() / (filled.astype(bool) | label).sum()
            assert overlap > 0.9, (name, finding, overlap)
            measured = {item.name.meaning: (item.value, item.unit.value) for item in group.get_measurements()}
            area = (region["area_mm2"], "mm2") if region.get("area_mm2") is not None else (region["area_px"], "{pixels}")
            value, unit = measured["Area"]
            assert float(value) == pytest.approx(area[0], rel=1e-4) and unit == area[1]
            assert float(measured["Map peak in region (fraction of the map's peak)"][0]) == pytest.approx(region["peak"], abs=1e-4)


def test_a_png_gets_no_seg_and_one_warning(run):
    study, result = run
    warnings = records_of(result.stdout)["a.png"]["warnings"]
    assert [line for line in warnings if "DICOM SEG" in line] == [
        "no DICOM SEG: a PNG file has no DICOM study to add a DICOM SEG to"]
    assert not list(study.glob("a.png.cxrtool.*.seg.dcm"))
    assert "outputs" not in stored_result(study, "a.png")


def test_dciodvfy_finds_no_error_in_the_seg(run):
    study, _ = run
    for name in (Path(source).name for source in SOURCES):
        assert_valid_dicom(seg_path(study, name), "Segmentation")


def test_the_seg_follows_its_result_and_a_study_without_regions_gets_none(dicom_dir, checkpoint, make_checkpoint, tmp_path):
    """Explained before without it: skipped, the SEG written from the stored masks; there:
    left alone; gone: written again, the same instance; explained again without it: gone.
    Nothing positive to map: no SEG, one warning."""
    import pydicom

    from cxrtool.explain import ExplainSettings, explain

    study = tmp_path / "study"
    study.mkdir()
    shutil.copyfile(dicom_dir / SOURCES[1], study / "siim.dcm")
    options = dict(model=checkpoint, workers=0, settings=ExplainSettings(findings=ASKED))
    assert explain([study], **options).predicted == 1
    assert "outputs" not in stored_result(study, "siim.dcm")
    assert explain([study], outputs=["seg"], **options).skipped == 1  # done before: its SEG from the stored masks
    path = seg_path(study, "siim.dcm")
    uid, stamp = pydicom.dcmread(path).SOPInstanceUID, path.stat().st_mtime_ns
    assert explain([study], outputs=["seg"], **options).skipped == 1 and path.stat().st_mtime_ns == stamp
    path.unlink()
    assert explain([study], outputs=["seg"], **options).skipped == 1
    assert pydicom.dcmread(path).SOPInstanceUID == uid
    assert explain([study], overwrite=True, **options).predicted == 1 and not path.exists()  # a result without it

    negative = make_checkpoint(FINDINGS, name="tiny", thresholds=dict.fromkeys(FINDINGS, 1.0))  # nothing is positive
    records: list[dict] = []
    assert explain([study], model=negative, workers=0, outputs=["seg"], on_result=records.append).predicted == 1
    (record,) = records
    assert record["warnings"] == ["no DICOM SEG: nothing was mapped (no positive finding)"]
    assert not list(study.glob("*.seg.dcm"))


def test_predict_refuses_seg_before_any_work(tmp_path, checkpoint):
    from cxrtool.errors import UsageError
    from cxrtool.predict import predict

    write_png(tmp_path / "a.png")
    for value in ("seg", "sr,seg"):
        result = runner.invoke(app, ["predict", str(tmp_path), "-m", str(checkpoint), "-j", "0", "--dicom", value])
        assert result.exit_code == 2
        assert "seg needs explain's maps: use cxrtool explain --dicom seg" in result.output
    with pytest.raises(UsageError, match="seg needs explain's maps"):
        predict([tmp_path], model=checkpoint, workers=0, outputs=["seg"])
    assert not list(tmp_path.glob("*.cxrtool.json"))
    check = "import sys, cxrtool.cli; assert 'highdicom' not in sys.modules and 'cxrtool.reports.seg' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], timeout=120).returncode == 0
