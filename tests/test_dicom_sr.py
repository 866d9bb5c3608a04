"""``cxrtool predict --dicom sr``: a DICOM Structured Report (TID 1500) of each DICOM study's
result, in its study, listed in the result; none for a PNG (one warning); read back with
highdicom, checked with dciodvfy where it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_valid_dicom, write_dicom, write_png
from typer.testing import CliRunner

from cxrtool import __version__
from cxrtool.cli import app

pytest.importorskip("highdicom", reason="the DICOM SR needs highdicom (in the test extra)")

FINDINGS = ("Effusion", "Atelectasis", "Pleural_Thickening")
# Small real radiographs: WG04's RG3 (CR, JPEG lossy 12-bit; name, ID, birth date, sex,
# accession number, study description) and SIIM's (CR as Secondary Capture, JPEG baseline;
# it also has the Patient Study module's Patient's Age, which the SR must not take).
SOURCES = ("wg04/RG3_JPLY.dcm", "siim/cxr_pa_jpeg_baseline.dcm")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["predict", *args])


def records_of(output: str) -> dict[str, dict]:
    return {record["file"]: record for record in (json.loads(line) for line in output.splitlines() if line.startswith("{"))}


def content_items(items, name: str):
    """The content items with this concept name's meaning, anywhere below ``items``."""
    for item in items:
        if item.ConceptNameCodeSequence[0].CodeMeaning == name:
            yield item
        yield from content_items(item.get("ContentSequence", []), name)


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint) -> Path:
    # Effusion is always called present (threshold 0), Atelectasis absent (threshold 1).
    return make_checkpoint(FINDINGS, name="tiny", thresholds={"Effusion": 0.0, "Atelectasis": 1.0})


@pytest.fixture(scope="module")
def run(dicom_dir, checkpoint, tmp_path_factory):
    """One run of ``predict --dicom sr --jsonl`` over two real DICOMs, a DICOM without study
    UIDs and a PNG (copies in a temporary folder: the SR goes beside its study)."""
    study = tmp_path_factory.mktemp("sr") / "study"
    study.mkdir()
    for name in SOURCES:
        shutil.copyfile(dicom_dir / name, study / Path(name).name)
    write_dicom(study / "no-study-uid.dcm")  # no Study or Series Instance UID: nothing to add an SR to
    write_png(study / "a.png")
    result = invoke(str(study), "-m", str(checkpoint), "-j", "0", "--runtime", "torch", "--dicom", "sr", "--jsonl")
    assert result.exit_code == 0, result.output
    return study, result


def sr_path(study: Path, name: str) -> Path:
    sidecar = json.loads((study / f"{name}.cxrtool.json").read_text())
    (result,) = sidecar["results"]
    (listed,) = result["outputs"]["sr"]
    assert listed == f"{name}.cxrtool.{result['model']['id']}.sr.dcm"
    return study / listed


def test_each_dicom_study_gets_an_sr_of_its_result_listed_in_the_result(run):
    import highdicom as hd
    import pydicom
    from pydicom.uid import ComprehensiveSRStorage

    study, result = run
    for name in (Path(source).name for source in SOURCES):
        path = sr_path(study, name)
        assert path.is_file()
        stored = json.loads((study / f"{name}.cxrtool.json").read_text())["results"][0]
        source = pydicom.dcmread(study / name, stop_before_pixels=True)
        document = hd.sr.srread(path)
        assert document.SOPClassUID == ComprehensiveSRStorage and document.Modality == "SR"
        # The same study (its UID kept), a new series, the source image referenced.
        assert document.StudyInstanceUID == source.StudyInstanceUID
        assert document.SeriesInstanceUID != source.SeriesInstanceUID
        assert document.get_evidence() == [(source.StudyInstanceUID, source.SeriesInstanceUID,
                                            source.SOPInstanceUID, source.SOPClassUID)]
        groups = document.content.get_image_measurement_groups()
        assert [group.tracking_identifier for group in groups] == list(FINDINGS)
        for group, (finding, call) in zip(groups, stored["findings"].items(), strict=True):
            measured = {item.name.meaning: item.value for item in group.get_measurements()}
            assert measured == {"Probability": pytest.approx(call["probability"]),
                                "Threshold Value": pytest.approx(call["threshold"])}
            (evaluation,) = group.get_qualitative_evaluations()
            assert evaluation.name == group.finding_type
            assert evaluation.value.meaning == ("Present" if call["positive"] else "Absent")
            assert evaluation.value.scheme_designator == "SCT"
            (image,) = group.source_images
            assert image.referenced_sop_instance_uid == source.SOPInstanceUID
            assert [item.value for item in content_items(group, "Algorithm Name")] == ["tiny"]
            assert [item.value for item in content_items(group, "Algorithm Version")] == [__version__]
            parameters = [item.value for item in content_items(group, "Algorithm Parameters")]
            assert f"model id {stored['model']['id']}" in parameters
            assert finding in [item.value for item in content_items(group, "Tracking Identifier")]
        calls = [group.get_qualitative_evaluations()[0].value.meaning for group in groups]
        assert calls[:2] == ["Present", "Absent"]  # thresholds 0 and 1
        codes = [(group.finding_type.value, group.finding_type.scheme_designator) for group in groups]
        assert codes == [("60046008", "SCT"), ("Atelectasis", "99CXRTOOL"), ("Pleural_Thickening", "99CXRTOOL")]
        assert [item.CodingSchemeDesignator for item in document.CodingSchemeIdentificationSequence] == ["99CXRTOOL"]
        assert records_of(result.stdout)[name]["status"] == "predicted"
        assert "warnings" not in records_of(result.stdout)[name]


def test_the_sr_carries_no_patient_or_study_attribute_the_source_lacks(run):
    import pydicom

    study, _ = run
    for name in (Path(source).name for source in SOURCES):
        source = pydicom.dcmread(study / name, stop_before_pixels=True)
        document = pydicom.dcmread(sr_path(study, name))
        for element in document:
            if element.tag.group == 0x0010 or element.keyword in ("StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                                                                  "StudyDescription", "ReferringPhysicianName"):
                if element.value not in (None, "", []):
                    assert element.keyword in source, element.keyword
                    assert str(element.value) == str(source[element.tag].value), element.keyword
        # Nothing of the source beyond the Patient and General Study modules: no Patient Study
        # module (SIIM's Patient's Age), no equipment or institution.
        assert "PatientAge" not in document
        assert document.Manufacturer == "cxrtool" and "InstitutionName" not in document
        assert "StationName" not in document and "ManufacturerModelName" not in document
    assert "PatientAge" in pydicom.dcmread(study / "cxr_pa_jpeg_baseline.dcm", stop_before_pixels=True)


def test_a_png_or_a_dicom_without_a_study_gets_no_sr_and_one_warning(run):
    study, result = run
    records = records_of(result.stdout)
    assert records["a.png"]["warnings"] == ["no DICOM SR: a PNG file has no DICOM study to add a DICOM SR to"]
    assert records["no-study-uid.dcm"]["warnings"] == ["no DICOM SR: the DICOM file has no StudyInstanceUID, "
                                                       "SeriesInstanceUID to reference"]
    assert result.output.count("no DICOM SR: a PNG file") == 2  # the --jsonl record and the one warning line
    assert not list(study.glob("a.png.cxrtool.*.sr.dcm")) and not list(study.glob("no-study-uid.dcm.cxrtool.*.sr.dcm"))
    for name in ("a.png", "no-study-uid.dcm"):
        assert "outputs" not in json.loads((study / f"{name}.cxrtool.json").read_text())["results"][0]


def test_dciodvfy_finds_no_error_in_the_sr(run):
    study, _ = run
    for name in (Path(source).name for source in SOURCES):
        assert_valid_dicom(sr_path(study, name), "ComprehensiveSR")


def test_the_sr_follows_its_result(dicom_dir, checkpoint, tmp_path):
    """Done before: skipped, the SR stays (a missing or foreign one is written again from the
    stored result); predicted again without the SR: the new result lists none, the old SR goes."""
    import pydicom

    from cxrtool.predict import predict

    study = tmp_path / "study"
    study.mkdir()
    shutil.copyfile(dicom_dir / SOURCES[0], study / "rg3.dcm")
    options = dict(model=checkpoint, workers=0, runtime="torch")
    assert predict([study], outputs=["sr"], **options).predicted == 1
    path = sr_path(study, "rg3.dcm")
    uid = pydicom.dcmread(path).SOPInstanceUID
    stamp = path.stat().st_mtime_ns

    again = predict([study], **options)  # the same settings without the SR: already done, nothing changes
    assert again.skipped == 1 and path.is_file() and path.stat().st_mtime_ns == stamp
    assert sr_path(study, "rg3.dcm") == path
    assert predict([study], outputs=["sr"], **options).skipped == 1  # done, its SR there: left alone
    assert path.stat().st_mtime_ns == stamp

    path.unlink()  # gone: written again from the stored result, the same instance
    assert predict([study], outputs=["sr"], **options).skipped == 1
    assert pydicom.dcmread(path).SOPInstanceUID == uid
    path.write_bytes(b"not this result's SR")  # not the result's: written again
    assert predict([study], outputs=["sr"], **options).skipped == 1
    assert pydicom.dcmread(path).SOPInstanceUID == uid

    redone = predict([study], overwrite=True, **options)  # a new result that lists no SR: the old one goes
    assert redone.predicted == 1 and not path.exists()
    assert "outputs" not in json.loads((study / "rg3.dcm.cxrtool.json").read_text())["results"][0]


def test_dicom_takes_registered_outputs_only_and_the_cli_stays_light(tmp_path, checkpoint, monkeypatch):
    write_png(tmp_path / "a.png")
    result = invoke(str(tmp_path), "-m", str(checkpoint), "-j", "0", "--dicom", "sr,rtss")
    assert result.exit_code == 2
    listed = re.search(r"--dicom: no DICOM output 'rtss'; the registered ones: (.*)", result.output)
    assert listed and {"sr", "seg"} <= set(listed.group(1).strip().split(", ")), result.output
    assert not list(tmp_path.glob("*.cxrtool.json"))  # refused before any work
    assert invoke(str(tmp_path), "-m", str(checkpoint), "--dicom", " , ").exit_code == 2
    check = "import sys, cxrtool.cli; assert 'highdicom' not in sys.modules and 'cxrtool.reports.sr' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check], timeout=120).returncode == 0
    from cxrtool.errors import UsageError
    from cxrtool.stages import output_kinds

    monkeypatch.setitem(sys.modules, "highdicom", None)  # not installed: said before any study is read
    with pytest.raises(UsageError, match=re.escape('needs highdicom: pip install "cxrtool[dicom]"')):
        output_kinds()["sr"].make(None)


def test_a_calibrated_and_a_zero_shot_finding_say_so_in_the_algorithm_parameters(dicom_dir):
    from cxrtool.io.records import ModelRef, make_result
    from cxrtool.reports.sr import build_report, source_header

    result = make_result(ModelRef("xrv", "densenet121", "ef" * 32), ["Effusion", "Scoliosis"], [0.7, 0.2], [0.5, 0.5],
                         settings={"predict": {}}, version="0.1.0", raw=[0.61, 0.2],
                         calibration={"method": "xrv_operating_points", "positive_when": "calibrated probability >= 0.5"},
                         zero_shot=["Scoliosis"])
    source = source_header(dicom_dir / SOURCES[0], {})
    document = build_report(source, result, version=__version__)
    effusion, scoliosis = ([item.TextValue for item in content_items(group.ContentSequence, "Algorithm Parameters")]
                           for group in content_items(document.ContentSequence, "Measurement Group"))
    assert 'calibration {"method": "xrv_operating_points", "positive_when": "calibrated probability >= 0.5"}' in effusion
    assert "raw probability 0.61" in effusion
    assert any(parameter.startswith("zero-shot:") for parameter in scoliosis)
    assert not any(parameter.startswith("calibration") for parameter in scoliosis)
    assert [item.TextValue for item in content_items(document.ContentSequence, "Algorithm Version")] == ["0.1.0"] * 2
