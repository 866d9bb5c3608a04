"""A PACS in the loop (issue 24): ``cxrtool predict dicomweb://...`` reads studies from a
real Orthanc (QIDO-RS, WADO-RS) into a cache, ``--store-to`` sends the SRs back (STOW-RS,
C-STORE); a re-run fetches and sends nothing; failures are one line naming the server.

Orthanc is Debian's (``apt-get install orthanc orthanc-dicomweb``), started by the session
fixture on free localhost ports with a temporary storage folder, and stopped after.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrtool.cli import app

pytest.importorskip("highdicom", reason="the DICOM SR needs highdicom (in the test extra)")
pytest.importorskip("dicomweb_client", reason="DICOMweb needs dicomweb-client (in the test extra)")
pytest.importorskip("pynetdicom", reason="C-STORE needs pynetdicom (in the test extra)")

FINDINGS = ("Effusion", "Atelectasis", "Pleural_Thickening")
SOURCES = ("siim/cxr_pa_jpeg_baseline.dcm", "wg04/RG3_JPLY.dcm")  # two small real radiographs, two studies
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb://127.0.0.1:{self.http_port}/dicom-web"

    @property
    def dimse(self) -> str:
        return f"dicom://{self.aet}@127.0.0.1:{self.dicom_port}"

    def call(self, path: str, body: bytes | dict | None = None) -> bytes:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        with urllib.request.urlopen(urllib.request.Request(self.rest + path, data=data), timeout=30) as answer:
            return answer.read()

    def json(self, path: str, body: bytes | dict | None = None):
        return json.loads(self.call(path, body))

    def instances(self, **query: str) -> list[str]:
        """Orthanc's ids of the instances whose tags match ``query`` (its REST API's /tools/find)."""
        return self.json("/tools/find", {"Level": "Instance", "Query": query})


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A throw-away Orthanc with the DICOMweb plugin, on free localhost ports; it checks the
    called AE title (so a wrong one is refused)."""
    binary = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").is_file() else None)
    if binary is None or not PLUGIN.is_file():
        pytest.skip("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb")
    folder = tmp_path_factory.mktemp("orthanc")
    server = Orthanc(free_port(), free_port(), "ORTHANC")
    config = {"Name": "cxrtool-tests", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": server.http_port, "DicomPort": server.dicom_port, "DicomAet": server.aet,
              "DicomCheckCalledAet": True, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
              "Plugins": [str(PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = open(folder / "orthanc.log", "wb")  # open while the server runs
    process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                server.json("/system")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"Orthanc did not start (exit {process.poll()}): {tail}")
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@dataclass(frozen=True)
class Uploaded:
    source: Path
    study: str
    sop: str


@pytest.fixture(scope="session")
def studies(orthanc, dicom_dir) -> dict[str, Uploaded]:
    """The real radiographs, uploaded to Orthanc through its REST API (POST /instances)."""
    import pydicom

    found = {}
    for source in SOURCES:
        path = dicom_dir / source
        orthanc.call("/instances", path.read_bytes())
        header = pydicom.dcmread(path, stop_before_pixels=True)
        found[Path(source).name] = Uploaded(path, str(header.StudyInstanceUID), str(header.SOPInstanceUID))
    return found


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint) -> Path:
    return make_checkpoint(FINDINGS, name="tiny", thresholds={"Effusion": 0.0, "Atelectasis": 1.0})


@pytest.fixture
def calls(monkeypatch):
    """How many WADO-RS retrievals, STOW-RS requests and C-STORE sends the runs make."""
    from dicomweb_client.api import DICOMwebClient

    from cxrtool.reports.store import DimseDestination

    counted = {"retrieve_instance": 0, "store_instances": 0, "c_store": 0}

    def counting(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counted[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counting(DICOMwebClient, "retrieve_instance", "retrieve_instance")
    counting(DICOMwebClient, "store_instances", "store_instances")
    counting(DimseDestination, "send", "c_store")
    return counted


def predict(*args: str):
    return runner.invoke(app, ["predict", *args, "-j", "0", "--runtime", "torch"])


def records_of(output: str) -> dict[str, dict]:
    return {record["file"]: record for record in (json.loads(line) for line in output.splitlines() if line.startswith("{"))}


def cached(out: Path, orthanc: Orthanc, study: Uploaded) -> Path:
    return out / "dicomweb" / f"127.0.0.1_{orthanc.http_port}_dicom-web" / study.study / f"{study.sop}.dcm"


def stored_result(path: Path) -> dict:
    (result,) = json.loads(path.with_name(path.name + ".cxrtool.json").read_text())["results"]
    return result


def check_sr_on_server(orthanc: Orthanc, study: Uploaded, local_sr: Path, result: dict) -> None:
    """The SR in Orthanc (found and fetched through its REST API) is the one written here, in
    the study's new SR series, with the sidecar's findings and probabilities."""
    import highdicom as hd
    import pydicom

    local = pydicom.dcmread(local_sr)
    (instance,) = orthanc.instances(SOPInstanceUID=str(local.SOPInstanceUID))
    tags = orthanc.json(f"/instances/{instance}/simplified-tags")
    assert tags["StudyInstanceUID"] == study.study and tags["Modality"] == "SR"
    series = orthanc.json(f"/instances/{instance}/series")
    assert series["MainDicomTags"]["SeriesInstanceUID"] == str(local.SeriesInstanceUID)
    stored = orthanc.call(f"/instances/{instance}/file")
    document = hd.sr.srread(pydicom.filebase.DicomBytesIO(stored))
    assert document.get_evidence()[0][2] == study.sop  # the source image referenced
    groups = document.content.get_image_measurement_groups()
    assert [group.tracking_identifier for group in groups] == list(FINDINGS)
    for group, (finding, call) in zip(groups, result["findings"].items(), strict=True):
        measured = {item.name.meaning: item.value for item in group.get_measurements()}
        assert measured["Probability"] == pytest.approx(call["probability"], abs=1e-6), finding
        assert measured["Threshold Value"] == pytest.approx(call["threshold"], abs=1e-6), finding
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.value.meaning == ("Present" if call["positive"] else "Absent")


def test_predict_reads_from_dicomweb_and_stores_the_sr_by_stow(orthanc, studies, checkpoint, tmp_path, calls):
    import pydicom

    out = tmp_path / "out"
    urls = [f"{orthanc.dicomweb}/studies/{study.study}" for study in studies.values()]
    args = [*urls, "-m", str(checkpoint), "--dicom", "sr", "--store-to", orthanc.dicomweb, "--out", str(out), "--jsonl"]
    first = predict(*args)
    assert first.exit_code == 0, first.output
    assert calls == {"retrieve_instance": 2, "store_instances": 2, "c_store": 0}
    assert f"store: DICOM objects to {orthanc.dicomweb}: 2 sent" in first.output
    records = records_of(first.stdout)
    for study in studies.values():
        path = cached(out, orthanc, study)
        assert records[path.name]["status"] == "predicted"
        assert pydicom.dcmread(path).PixelData == pydicom.dcmread(study.source).PixelData  # the instance as uploaded
        result = stored_result(path)
        (sr_name,) = result["outputs"]["sr"]
        assert (path.parent / "cxrtool_predictions.csv").is_file()  # the cached study's table, beside it
        check_sr_on_server(orthanc, study, path.parent / sr_name, result)
        journal = json.loads((path.parent / "cxrtool_sent.json").read_text())
        entry = journal[orthanc.dicomweb][sr_name]
        assert entry["status"] == "sent" and entry["study"] == path.name
        assert entry["sop_instance_uid"] == str(pydicom.dcmread(path.parent / sr_name).SOPInstanceUID)
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*") if path.is_file() and path.name != ".cxrtool.lock"}
    on_server = len(orthanc.json("/instances"))

    # Again: done, so nothing is fetched (WADO) or sent (STOW); the SRs now on the server are
    # listed by QIDO and passed over (not images).
    calls.update(dict.fromkeys(calls, 0))
    again = predict(*args)
    assert again.exit_code == 0, again.output
    assert calls == {"retrieve_instance": 0, "store_instances": 0, "c_store": 0}
    assert {record["status"] for record in records_of(again.stdout).values()} == {"skipped"}
    assert "0 predicted, 2 already done" in again.output
    assert "2 sent before" in again.output and "2 not an image (on the DICOMweb server" in again.output
    changed = [path for path, stamp in stamps.items() if path.stat().st_mtime_ns != stamp
               and path.name not in ("cxrtool_predictions.csv", "cxrtool_predictions.json")]
    assert changed == []
    assert len(orthanc.json("/instances")) == on_server


def test_the_cached_instance_is_the_one_on_the_server(orthanc, studies, checkpoint, tmp_path):
    """What the cache holds is the instance as uploaded: the same UIDs, transfer syntax and pixels."""
    import pydicom

    study = studies["RG3_JPLY.dcm"]
    result = predict(f"{orthanc.dicomweb}/studies/{study.study}", "-m", str(checkpoint), "--cache", str(tmp_path / "c"))
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "c").rglob(f"{study.sop}.dcm")
    assert path.parent.name == study.study and path.parent.parent.name == f"127.0.0.1_{orthanc.http_port}_dicom-web"
    copy, source = pydicom.dcmread(path), pydicom.dcmread(study.source)
    assert copy.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    assert copy.SOPInstanceUID == source.SOPInstanceUID and copy.PixelData == source.PixelData


def test_store_to_a_dicom_node_by_c_store(orthanc, studies, checkpoint, tmp_path, calls):
    import pydicom

    study = studies["RG3_JPLY.dcm"]
    out = tmp_path / "out"
    args = [f"{orthanc.dicomweb}/studies/{study.study}", "-m", str(checkpoint), "--dicom", "sr",
            "--store-to", orthanc.dimse, "--out", str(out)]
    first = predict(*args)
    assert first.exit_code == 0, first.output
    assert calls == {"retrieve_instance": 1, "store_instances": 0, "c_store": 1}
    path = cached(out, orthanc, study)
    result = stored_result(path)
    sr = path.parent / result["outputs"]["sr"][0]
    check_sr_on_server(orthanc, study, sr, result)
    journal = json.loads((path.parent / "cxrtool_sent.json").read_text())
    assert journal[orthanc.dimse][sr.name]["sop_instance_uid"] == str(pydicom.dcmread(sr).SOPInstanceUID)

    calls.update(dict.fromkeys(calls, 0))
    again = predict(*args)
    assert again.exit_code == 0, again.output
    assert calls == {"retrieve_instance": 0, "store_instances": 0, "c_store": 0}
    assert "1 sent before" in again.output


def test_explain_reads_from_dicomweb_and_stores_its_sr_and_seg(orthanc, studies, checkpoint, tmp_path, calls):
    """explain dicomweb://... --dicom sr,seg --store-to: the SEG and the SR (its regions as
    planar ROIs) land in the study on the server, equal to the files written here; a re-run
    fetches and sends nothing."""
    import highdicom as hd
    import numpy as np
    import pydicom

    study = studies["cxr_pa_jpeg_baseline.dcm"]
    out = tmp_path / "out"
    args = ["explain", f"{orthanc.dicomweb}/studies/{study.study}", "-m", str(checkpoint), "-j", "0",
            "--dicom", "sr,seg", "--store-to", orthanc.dicomweb, "--out", str(out)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert calls == {"retrieve_instance": 1, "store_instances": 1, "c_store": 0}  # one STOW request: the study's SR and SEG
    assert f"store: DICOM objects to {orthanc.dicomweb}: 2 sent" in first.output
    path = cached(out, orthanc, study)
    result = stored_result(path)
    (seg_name,), (sr_name,) = result["outputs"]["seg"], result["outputs"]["sr"]
    local_seg = pydicom.dcmread(path.parent / seg_name)
    (instance,) = orthanc.instances(SOPInstanceUID=str(local_seg.SOPInstanceUID))
    tags = orthanc.json(f"/instances/{instance}/simplified-tags")
    assert (tags["Modality"], tags["StudyInstanceUID"]) == ("SEG", study.study)
    on_server = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.call(f"/instances/{instance}/file")))
    assert [item.SegmentLabel for item in on_server.SegmentSequence] == ["Effusion"]
    assert np.array_equal(on_server.pixel_array, local_seg.pixel_array)
    local_sr = pydicom.dcmread(path.parent / sr_name)
    (instance,) = orthanc.instances(SOPInstanceUID=str(local_sr.SOPInstanceUID))
    report = hd.sr.srread(pydicom.filebase.DicomBytesIO(orthanc.call(f"/instances/{instance}/file")))
    regions = result["explanations"]["findings"]["Effusion"]["regions"]
    assert [group.tracking_identifier for group in report.content.get_planar_roi_measurement_groups()] \
        == [f"Effusion region {region['label']}" for region in regions]

    calls.update(dict.fromkeys(calls, 0))
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert calls == {"retrieve_instance": 0, "store_instances": 0, "c_store": 0}
    assert "2 sent before" in again.output


def test_radiomics_stores_its_sr_of_explains_regions(orthanc, studies, checkpoint, tmp_path, calls):
    """radiomics --from-cam --dicom sr --store-to on a study explained from the server: the
    radiomics SR lands in the study; a re-run sends nothing."""
    import pydicom

    study = studies["RG3_JPLY.dcm"]
    out = tmp_path / "out"
    explained = runner.invoke(app, ["explain", f"{orthanc.dicomweb}/studies/{study.study}", "-m", str(checkpoint),
                                    "-j", "0", "--out", str(out)])
    assert explained.exit_code == 0, explained.output
    args = ["radiomics", "--explanations", str(out), "--include-off-chest", "--classes", "firstorder", "-j", "0",
            "--dicom", "sr", "--store-to", orthanc.dicomweb, "--out", str(tmp_path / "features.csv")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"store: DICOM objects to {orthanc.dicomweb}: 1 sent" in first.output
    (report,) = out.rglob("*.radiomics.sr.dcm")
    uid = str(pydicom.dcmread(report, stop_before_pixels=True).SOPInstanceUID)
    (instance,) = orthanc.instances(SOPInstanceUID=uid)
    tags = orthanc.json(f"/instances/{instance}/simplified-tags")
    assert (tags["Modality"], tags["StudyInstanceUID"], tags["SeriesNumber"]) == ("SR", study.study, "9003")
    calls.update(dict.fromkeys(calls, 0))
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "1 sent before" in again.output and calls["store_instances"] == 0


def single_line(output: str, start: str) -> str:
    (line,) = [line for line in output.splitlines() if line.startswith(start)]
    assert "Traceback" not in output
    return line


def test_an_unreachable_or_wrong_server_fails_the_source_in_one_line(orthanc, studies, checkpoint, tmp_path):
    study = studies["cxr_pa_jpeg_baseline.dcm"]
    nobody = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    good = f"{orthanc.dicomweb}/studies/{study.study}"
    result = predict(f"{nobody}/studies/{study.study}", f"dicomweb://127.0.0.1:{orthanc.http_port}/nowhere/studies/1.2.3",
                     good, "-m", str(checkpoint), "--out", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert single_line(result.output, f"failed {nobody}/") == \
        f"failed {nobody}/studies/{study.study}: {nobody}: unreachable ([Errno 111] Connection refused)"
    line = single_line(result.output, f"failed dicomweb://127.0.0.1:{orthanc.http_port}/nowhere/")
    assert line.startswith(f"failed dicomweb://127.0.0.1:{orthanc.http_port}/nowhere/studies/1.2.3: "
                           f"dicomweb://127.0.0.1:{orthanc.http_port}/nowhere: the server answered HTTP 404 Not Found")
    assert "1 predicted, 0 already done, 2 failed of 3 studies" in result.output  # the rest of the batch went on


def test_a_fetch_that_fails_fails_that_study_only(orthanc, studies, checkpoint, tmp_path, monkeypatch):
    """An instance QIDO lists but WADO cannot give (gone since) fails with the server's answer;
    the study beside it is done."""
    from cxrtool.io.dicomweb import Instance, RemoteStudies

    study = studies["RG3_JPLY.dcm"]
    listed = RemoteStudies._list

    def with_a_ghost(self, source):
        found = listed(self, source)
        real = found[0][0]
        return [*found, (Instance(source, real.study, real.series, "1.2.3.4.5.6"), True)]

    monkeypatch.setattr(RemoteStudies, "_list", with_a_ghost)
    result = predict(f"{orthanc.dicomweb}/studies/{study.study}", "-m", str(checkpoint), "--out", str(tmp_path))
    assert result.exit_code == 1, result.output
    ghost = tmp_path / "dicomweb" / f"127.0.0.1_{orthanc.http_port}_dicom-web" / study.study / "1.2.3.4.5.6.dcm"
    assert single_line(result.output, "failed ") == (
        f"failed {ghost}: could not be fetched: {orthanc.dicomweb}: the server answered HTTP 404 Not Found: "
        "Accessing an inexistent instance with WADO-RS: 1.2.3.4.5.6")
    assert "1 predicted, 0 already done, 1 failed of 2 studies" in result.output
    table = (ghost.parent / "cxrtool_predictions.csv").read_text()
    assert "1.2.3.4.5.6.dcm" in table and "could not be fetched" in table


def test_a_server_that_never_answers_times_out_in_one_line(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTOOL_PACS_TIMEOUT", "1")
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        service = f"dicomweb://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        result = predict(f"{service}/studies/1.2.3", "-m", str(checkpoint), "--out", str(tmp_path))
    assert result.exit_code == 1, result.output
    assert single_line(result.output, "failed ") == f"failed {service}/studies/1.2.3: {service}: no answer within 1 s (timed out)"


def test_a_send_that_fails_is_said_per_study_exits_1_and_keeps_the_result(orthanc, studies, checkpoint, tmp_path):
    study = studies["cxr_pa_jpeg_baseline.dcm"]
    out = tmp_path / "out"
    source = f"{orthanc.dicomweb}/studies/{study.study}"
    nobody = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    wrong = f"dicom://WRONG@127.0.0.1:{orthanc.dicom_port}"
    for target, why in ((nobody, f"{nobody}: unreachable ([Errno 111] Connection refused)"),
                        (wrong, f"{wrong}: the association was refused (Rejected Permanent, Service User: "
                                "Called AE title not recognised)")):
        result = predict(source, "-m", str(checkpoint), "--dicom", "sr", "--store-to", target, "--out", str(out))
        assert result.exit_code == 1, result.output
        path = cached(out, orthanc, study)
        assert single_line(result.output, "not sent: ") == f"not sent: {why}: {path}"
        assert f"store: DICOM objects to {target}: 1 could not be sent (run again to retry them)" in result.output
        assert "0 failed of 1 studies" in result.output  # the prediction stands
        assert stored_result(path)["outputs"]["sr"]
        entry = json.loads((path.parent / "cxrtool_sent.json").read_text())[target]
        assert [value["status"] for value in entry.values()] == ["failed"]
        assert next(iter(entry.values()))["error"] == why


class Flaky:
    """A destination that refuses the first time, then takes everything."""

    name = "dicomweb://flaky.example:8042/dicom-web"

    def __init__(self) -> None:
        self.tries = 0
        self.sent: list[str] = []

    def send(self, files):
        import pydicom

        from cxrtool.reports.store import SendError

        self.tries += 1
        if self.tries == 1:
            raise SendError(f"{self.name}: the server answered HTTP 503 Service Unavailable")
        uids = [str(pydicom.dcmread(path).SOPInstanceUID) for path in files]
        self.sent += uids
        return uids

    def close(self) -> None:
        pass


def test_a_study_that_failed_to_send_is_retried_next_run_and_says_so(dicom_dir, checkpoint, tmp_path):
    from cxrtool.predict import predict as run_predict
    from cxrtool.reports.store import JOURNAL, StoreStage
    from cxrtool.stages import OutputKind

    study = tmp_path / "study"
    study.mkdir()
    shutil.copyfile(dicom_dir / SOURCES[1], study / "rg3.dcm")
    flaky = Flaky()
    kind = OutputKind("store", "flaky", lambda context: StoreStage(context, flaky))
    notes: list[str] = []
    options = dict(model=checkpoint, workers=0, runtime="torch", outputs=["sr", kind], note=notes.append)

    first = run_predict([study], **options)
    assert first.predicted == 1 and first.exit_code == 1
    assert first.problems == [(str(study / "rg3.dcm"), f"not sent: {flaky.name}: the server answered HTTP 503 Service Unavailable")]
    second = run_predict([study], **options)
    assert second.skipped == 1 and second.exit_code == 0 and len(flaky.sent) == 1
    assert f"sent {study / 'rg3.dcm'} to {flaky.name} (retried: the last run could not: {flaky.name}: the server " \
           "answered HTTP 503 Service Unavailable)" in notes
    (entry,) = json.loads((study / JOURNAL).read_text())[flaky.name].values()
    assert entry["status"] == "sent" and entry["sop_instance_uid"] == flaky.sent[0]
    third = run_predict([study], **options)
    assert third.exit_code == 0 and flaky.tries == 2  # sent before: not again
    time.sleep(1.05)  # a result is stamped to the second: one made in the same second is the same SR, not sent again
    redone = run_predict([study], **{**options, "overwrite": True})  # a new result, a new SR: sent again
    assert redone.exit_code == 0 and flaky.tries == 3 and len(set(flaky.sent)) == 2


def test_usage_errors_are_said_before_any_work(checkpoint, tmp_path):
    local = ["-m", str(checkpoint), str(tmp_path)]
    cases = {
        ("--store-to", "dicomweb://127.0.0.1:9/dicom-web"): "--store-to sends the DICOM objects the run writes",
        ("--dicom", "sr", "--store-to", "ftp://pacs"): "--store-to 'ftp://pacs': give dicomweb://HOST:PORT/PATH",
        ("--dicom", "sr", "--store-to", "dicom://127.0.0.1:104"): "a DICOM node is dicom://AET@HOST:PORT",
        ("--dicom", "store"): "--dicom: no DICOM output 'store'",
    }
    for extra, message in cases.items():
        result = predict(*local, *extra)
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output
    result = predict("dicomweb://127.0.0.1:9/dicom-web/studies/1.2.3", "-m", str(checkpoint))
    assert result.exit_code == 2 and "needs a folder to be cached in: --out DIR" in result.output
    result = predict("dicomweb://127.0.0.1:9/dicom-web/patients/7", "-m", str(checkpoint), "--out", str(tmp_path))
    assert result.exit_code == 2 and "no studies named" in result.output
    assert not list(tmp_path.rglob("*.cxrtool.json"))
    check = "import sys, cxrtool.cli; assert not {'cxrtool.reports.store', 'dicomweb_client', 'pynetdicom'} & set(sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], timeout=120).returncode == 0
