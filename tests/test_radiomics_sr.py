"""``cxrtool radiomics ... --dicom sr``: each DICOM image's regions in a Structured Report,
each region a TID 1410 group (its outline, or its SEG segment by reference) with its
PyRadiomics features as measurements coded as pyradiomics-dcm codes them; read back with
highdicom to the table's values; checked with dciodvfy; kept, rewritten or removed with the
table's rows."""

from __future__ import annotations

import base64
import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_valid_dicom, write_png
from typer.testing import CliRunner

from cxrtool.cli import app

pytest.importorskip("highdicom", reason="the DICOM SR needs highdicom (in the test extra)")

FINDINGS = ("Effusion", "Nodule", "Cardiomegaly")
SOURCES = ("wg04/RG3_JPLY.dcm", "siim/cxr_pa_jpeg_baseline.dcm")
CLASSES = "firstorder,shape2D"
runner = CliRunner()


def radiomics(*args: str):
    return runner.invoke(app, ["radiomics", *args, "-j", "0", "--classes", CLASSES])


def table_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def measurements(group) -> dict[tuple[str, str, tuple], float]:
    """A group's measurements: (code value, scheme, modifiers' meanings) -> value."""
    found = {}
    for item in group.get_measurements():
        content = item[0].get("ContentSequence", [])  # (a Measurement read back: a template of one NUM item)
        modifiers = tuple((entry.ConceptNameCodeSequence[0].CodeMeaning, entry.ConceptCodeSequence[0].CodeMeaning)
                          for entry in content if entry.RelationshipType == "HAS CONCEPT MOD")
        found[(item.name.value, item.name.scheme_designator, modifiers)] = float(item.value)
    return found


@pytest.fixture(scope="module")
def explained(dicom_dir, make_checkpoint, tmp_path_factory):
    """Two real radiographs and a PNG, explained with a SEG (Effusion always positive)."""
    study = tmp_path_factory.mktemp("rsr") / "study"
    study.mkdir()
    for name in SOURCES:
        shutil.copyfile(dicom_dir / name, study / Path(name).name)
    write_png(study / "a.png")
    checkpoint = make_checkpoint(FINDINGS, name="tiny", thresholds={"Effusion": 0.0})
    result = runner.invoke(app, ["explain", str(study), "-m", str(checkpoint), "-j", "0", "-f", "Effusion",
                                 "--dicom", "seg"])
    assert result.exit_code == 0, result.output
    return study


def test_cam_regions_go_into_an_sr_per_image_with_the_tables_features(explained, tmp_path):
    import highdicom as hd
    import pydicom

    table = tmp_path / "cam.csv"
    result = radiomics(str(explained), "--from-cam", "--include-off-chest", "--dicom", "sr", "--out", str(table))
    assert result.exit_code == 0, result.output
    rows = table_rows(table)
    png = sum(row["image"].endswith("a.png") for row in rows)
    assert png and f"DICOM SR of the regions: 2 written, 0 up to date, {png} regions of PNG/JPEG images have none" \
        in result.output
    for name in (Path(source).name for source in SOURCES):
        mine = [row for row in rows if Path(row["image"]).name == name]
        model = mine[0]["model"]
        path = explained / f"{name}.cxrtool.{model}.radiomics.sr.dcm"
        assert_valid_dicom(path, "ComprehensiveSR")
        source = pydicom.dcmread(explained / name, stop_before_pixels=True)
        report = hd.sr.srread(path)
        assert report.StudyInstanceUID == source.StudyInstanceUID and report.SeriesNumber == 9003
        assert report.get_evidence()[0][2] == source.SOPInstanceUID
        groups = report.content.get_planar_roi_measurement_groups()
        assert [group.tracking_identifier for group in groups] == [f"Effusion region {row['region']}" for row in mine]
        for group, row in zip(groups, mine, strict=True):
            assert group.finding_type.value == "60046008"  # Pleural effusion, the finding's SCT code
            assert group.roi.GraphicType == "POLYLINE"
            values = measurements(group)
            # An IBSI-coded feature (firstorder Mean: Q4LE), on the original image and on a
            # Laplacian of Gaussian, with pyradiomics-dcm's private modifiers.
            assert values[("Q4LE", "IBSI", ())] == pytest.approx(float(row["original_firstorder_Mean"]), rel=1e-9)
            log = (("Image transformation", "Laplacian of Gaussian"), ("Kernel size", "1.0 mm"))
            assert values[("Q4LE", "IBSI", log)] == pytest.approx(float(row["log-sigma-1-0-mm-3D_firstorder_Mean"]),
                                                                  rel=1e-9)
            wavelet = (("Image transformation", "Wavelet transformation"), ("Wavelet sub-band", "H"))
            assert values[("Q4LE", "IBSI", wavelet)] == pytest.approx(float(row["wavelet-H_firstorder_Mean"]), rel=1e-9)
            # A feature without an IBSI code: pyradiomics-dcm's private code of "class_Feature".
            private = base64.b64encode(hashlib.sha1(b"shape2D_Perimeter").digest()).decode()[:6]
            assert values[(private, "99PYRADIOMICS", ())] == pytest.approx(float(row["original_shape2D_Perimeter"]),
                                                                           rel=1e-9)
            features = [key for key in row if key.split("_")[0] in ("original", "wavelet-H", "wavelet-L")
                        or key.startswith("log-sigma")]
            finite = [key for key in features if row[key] not in ("", "nan") and np.isfinite(float(row[key]))]
            assert len(values) == len(finite)  # every finite feature, once
    assert not list(explained.glob("a.png.*radiomics.sr.dcm"))

    # Again: the same rows, the same instances: nothing written.
    stamps = {path: path.stat().st_mtime_ns for path in explained.glob("*.radiomics.sr.dcm")}
    again = radiomics(str(explained), "--from-cam", "--include-off-chest", "--dicom", "sr", "--out", str(table))
    assert again.exit_code == 0, again.output
    assert "0 written, 2 up to date" in again.output
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps


def test_a_segs_segments_are_referenced_by_frame_and_their_codes_kept(explained, tmp_path):
    import highdicom as hd
    import pydicom

    name = "cxr_pa_jpeg_baseline.dcm"
    (seg,) = explained.glob(f"{name}.cxrtool.*.seg.dcm")
    result = radiomics(str(explained / name), str(seg), "--dicom", "sr", "--out", str(tmp_path / "seg.csv"))
    assert result.exit_code == 0, result.output
    path = explained / f"{name}.cxrtool.radiomics.sr.dcm"  # no model: beside the SEG
    assert_valid_dicom(path, "ComprehensiveSR")
    report = hd.sr.srread(path)
    header = pydicom.dcmread(seg, stop_before_pixels=True)
    assert str(header.SOPInstanceUID) in [sop for _, _, sop, _ in report.get_evidence()]  # the SEG is evidence
    (group,) = report.content.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "Effusion" and group.finding_type.value == "60046008"
    (reference,) = group.referenced_segmentation_frame[0].ReferencedSOPSequence
    assert reference.ReferencedSOPInstanceUID == header.SOPInstanceUID and int(reference.ReferencedFrameNumber) == 1
    (row,) = table_rows(tmp_path / "seg.csv")
    assert measurements(group)[("Q4LE", "IBSI", ())] == pytest.approx(float(row["original_firstorder_Mean"]), rel=1e-9)


def test_whole_images_and_masks_beside_and_an_sr_whose_rows_fail_goes(dicom_dir, tmp_path):
    """A whole image: the image's border; a mask beside the study: its label's outline; the
    mask broken: the row fails, the SR goes (it would say what the table no longer does)."""
    import cv2
    import highdicom as hd
    import pydicom

    study = tmp_path / "study"
    study.mkdir()
    shutil.copyfile(dicom_dir / SOURCES[1], study / "siim.dcm")
    source = pydicom.dcmread(study / "siim.dcm", stop_before_pixels=True)
    table = tmp_path / "t.csv"
    assert radiomics(str(study), "--dicom", "sr", "--out", str(table)).exit_code == 0
    path = study / "siim.dcm.cxrtool.radiomics.sr.dcm"
    (group,) = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "whole image"
    points = np.asarray(group.roi.GraphicData, float).reshape(-1, 2)
    assert {tuple(p) for p in points} == {(0, 0), (source.Columns, 0), (source.Columns, source.Rows), (0, source.Rows)}

    mask = np.zeros((source.Rows, source.Columns), np.uint8)
    mask[100:300, 200:500] = 1
    cv2.imwrite(str(study / "siim.mask.png"), mask)
    table = tmp_path / "t2.csv"  # (the first table keeps its whole-image row: its SR would hold both regions)
    result = radiomics(str(study), "--dicom", "sr", "--out", str(table))
    assert result.exit_code == 0, result.output
    (group,) = hd.sr.srread(path).content.get_planar_roi_measurement_groups()
    assert group.tracking_identifier == "label 1 of siim.mask.png" and group.finding_type is None
    points = np.asarray(group.roi.GraphicData, float).reshape(-1, 2)
    assert points.min(axis=0).tolist() == [200.5, 100.5] and points.max(axis=0).tolist() == [499.5, 299.5]
    assert_valid_dicom(path, "ComprehensiveSR")

    cv2.imwrite(str(study / "siim.mask.png"), np.zeros_like(mask))  # label 1 gone: the region fails
    result = radiomics(str(study), "--dicom", "sr", "--out", str(table))
    assert result.exit_code == 1
    assert "1 removed (their regions can no longer be measured)" in result.output
    assert not path.exists()


def test_coding_follows_pyradiomics_dcm():
    from cxrtool.reports.radiomics_sr import feature_code, ibsi_codes

    assert feature_code("original_firstorder_Mean") == (("Q4LE", "IBSI", "Mean"), [])
    # pyradiomics-dcm's table files these GLSZM features under glcm; here they are GLSZM's.
    assert feature_code("original_glszm_SmallAreaLowGrayLevelEmphasis")[0] == \
        ("5RAI", "IBSI", "Small zone low grey level emphasis")
    assert feature_code("original_glszm_LowGrayLevelZoneEmphasis")[0][0] == "S1RA"
    assert feature_code("original_glcm_Imc1")[0][1] == "99PYRADIOMICS"
    assert feature_code("unknownfilter_firstorder_Mean") is None  # left out, as pyradiomics-dcm does
    assert feature_code("diagnostics_Versions_PyRadiomics") is None
    assert len(ibsi_codes()) > 100


def test_usage_errors_before_any_work(explained, tmp_path):
    refused = radiomics(str(explained), "--dicom", "seg", "--out", str(tmp_path / "x.csv"))
    assert refused.exit_code == 2 and "radiomics writes sr" in refused.output
    refused = radiomics(str(explained), "--store-to", "dicomweb://127.0.0.1:1/x", "--out", str(tmp_path / "x.csv"))
    assert refused.exit_code == 2 and "--store-to sends the DICOM objects the run writes" in refused.output
    assert not (tmp_path / "x.csv").exists()
