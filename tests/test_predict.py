"""`cxrtool predict` through the real CLI: files written, skips, exit codes, no patient IDs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import write_dicom, write_png
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.io.outputs import FOLDER_CSV, FOLDER_JSON
from cxrtool.models.checkpoint import ModelCard, save_checkpoint
from cxrtool.preprocess import Preprocessing

FINDINGS = ["Effusion", "Nodule", "Cardiomegaly"]
runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from cxrtool.models.network import CXRClassifier

    torch.manual_seed(0)
    model = CXRClassifier("resnet18", FINDINGS)
    card = ModelCard("resnet18", FINDINGS, Preprocessing(input_size=64).to_dict(), name="tiny",
                     thresholds={"Effusion": 0.0, "Nodule": 1.0})
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors", model, card)


@pytest.fixture
def study(tmp_path) -> Path:
    folder = tmp_path / "study"
    (folder / "sub").mkdir(parents=True)
    write_png(folder / "a.png")
    write_png(folder / "sub" / "b.png", seed=1)
    write_dicom(folder / "c.dcm")
    write_dicom(folder / "noext")  # DICOM without extension, found by content
    return folder


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, ["predict", *args], input=input)


def test_predict_writes_sidecars_and_folder_csvs(study, checkpoint):
    result = invoke(str(study), "--model", str(checkpoint), "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = read_csv(study / FOLDER_CSV)
    assert [r["file"] for r in rows] == ["a.png", "c.dcm", "noext"]
    assert list(rows[0]) == ["file", "model", "model_id", *FINDINGS, "view_position", "error"]
    assert rows[1]["view_position"] == "PA" and rows[1]["model"] == "tiny"
    assert [r["file"] for r in read_csv(study / "sub" / FOLDER_CSV)] == ["b.png"]
    sidecar = json.loads((study / "c.dcm.cxrtool.json").read_text())
    assert sidecar["schema"] == "cxrtool-sidecar" and sidecar["schema_version"] == 2
    (result,) = sidecar["results"]
    assert set(result["findings"]) == set(FINDINGS)
    assert result["findings"]["Effusion"]["positive"] is True  # threshold 0 from the card
    assert result["findings"]["Nodule"]["positive"] is False  # threshold 1
    assert result["model"]["name"] == "tiny" and len(sidecar["sha256"]) == 64
    assert result["model"]["id"] == rows[1]["model_id"] == result["model"]["sha256"][:12]
    assert sidecar["pixel_spacing_mm"] == [0.5, 0.5] and sidecar["view_position"] == "PA"
    assert sidecar["source"] == "c.dcm"
    assert float(rows[1]["Effusion"]) == pytest.approx(result["findings"]["Effusion"]["probability"], abs=1e-6)
    (entry,) = json.loads((study / FOLDER_JSON).read_text())["models"].values()
    assert entry["thresholds"]["Nodule"] == 1.0 and entry["name"] == "tiny"
    # No patient identifiers anywhere unless asked, and no temporary files left behind.
    for path in study.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".csv"):
            text = path.read_text()
            assert "SECRET-123" not in text and "Doe" not in text, path
    assert not list(study.rglob("*.tmp"))


def test_rerun_skips_done_studies_and_overwrite_redoes_them(study, checkpoint):
    assert invoke(str(study), "-m", str(checkpoint), "-j", "0").exit_code == 0
    stamp = (study / "a.png.cxrtool.json").stat().st_mtime_ns
    result = invoke(str(study), "-m", str(checkpoint), "-j", "0", "--jsonl")
    assert result.exit_code == 0
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {r["status"] for r in records} == {"skipped"}
    assert (study / "a.png.cxrtool.json").stat().st_mtime_ns == stamp
    assert len(read_csv(study / FOLDER_CSV)) == 3  # CSV stays complete
    result = invoke(str(study), "-m", str(checkpoint), "-j", "0", "--jsonl", "--overwrite")
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert {r["status"] for r in records} == {"predicted"} and len(records) == 4


def test_bad_inputs_fail_alone_with_reasons_and_exit_1(study, checkpoint, dicom_dir):
    good = study / "c.dcm"
    (study / "truncated.dcm").write_bytes(good.read_bytes()[:-1000])
    (study / "empty.png").write_bytes(b"")
    (study / "corrupt.png").write_bytes((study / "a.png").read_bytes()[:80])
    (study / "report.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    result = invoke(str(study), str(study / "missing.png"), "-m", str(checkpoint), "-j", "2")
    assert result.exit_code == 1, result.output
    rows = {r["file"]: r for r in read_csv(study / FOLDER_CSV)}
    for name in ("truncated.dcm", "empty.png", "corrupt.png", "report.dcm", "missing.png"):
        assert rows[name]["error"], name
        assert "\n" not in rows[name]["error"]
        assert f"{name}" in result.output
    assert "empty file" in rows["empty.png"]["error"]
    assert rows["missing.png"]["error"] == "no such file"
    for name in ("a.png", "c.dcm", "noext"):
        assert rows[name]["error"] == "" and rows[name]["Effusion"]
    # A failed study is retried on the next run (it has no sidecar).
    assert not (study / "truncated.dcm.cxrtool.json").exists()


def test_out_mirror_tree_and_stdin_list(study, checkpoint, tmp_path):
    out = tmp_path / "results"
    paths = "\n".join(str(p) for p in (study / "a.png", study / "sub" / "b.png")) + "\n"
    result = invoke("-", "-m", str(checkpoint), "-j", "0", "--out", str(out), "--jsonl", input=paths)
    assert result.exit_code == 0, result.output
    assert (out / "a.png.cxrtool.json").is_file()
    assert (out / "sub" / "b.png.cxrtool.json").is_file()
    # each sidecar in the mirror says where its study is, relative to itself
    source = json.loads((out / "sub" / "b.png.cxrtool.json").read_text())["source"]
    assert (out / "sub" / source).resolve() == (study / "sub" / "b.png").resolve()
    assert not (study / "a.png.cxrtool.json").exists()  # inputs untouched
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["file"] for r in lines) == ["a.png", "b.png"]


def test_glob_inputs(study, checkpoint):
    result = invoke(str(study / "*.png"), "-m", str(checkpoint), "-j", "0")
    assert result.exit_code == 0
    assert [r["file"] for r in read_csv(study / FOLDER_CSV)] == ["a.png"]


def test_include_patient_id_on_request(study, checkpoint):
    result = invoke(str(study / "c.dcm"), "-m", str(checkpoint), "-j", "0", "--include-patient-id", "--jsonl")
    assert result.exit_code == 0
    assert json.loads((study / "c.dcm.cxrtool.json").read_text())["patient_id"] == "SECRET-123"
    assert json.loads(result.stdout.splitlines()[0])["patient_id"] == "SECRET-123"


def test_usage_errors_exit_2(study, checkpoint, tmp_path):
    assert invoke(str(tmp_path / "nothing-here"), "-m", str(checkpoint)).exit_code == 1  # reported, like a bad file
    empty = tmp_path / "empty"
    empty.mkdir()
    result = invoke(str(empty), "-m", str(checkpoint))
    assert result.exit_code == 2 and "no studies" in result.output
    result = invoke(str(study), "-m", str(tmp_path / "missing.safetensors"))
    assert result.exit_code == 2 and "no such checkpoint" in result.output
    result = invoke(str(study), "-m", str(checkpoint), "--device", "cuda:7")
    assert result.exit_code == 2


def test_real_nih_and_dicom_files(nih_dir, dicom_dir, checkpoint, tmp_path):
    names = sorted(p.name for p in (nih_dir / "images").glob("*.png"))[:6]
    inputs = [str(nih_dir / "images" / n) for n in names] + [str(p) for p in sorted(dicom_dir.rglob("*.dcm"))]
    out = tmp_path / "out"
    result = invoke(*inputs, "-m", str(checkpoint), "--out", str(out), "-j", "2", "-b", "8")
    assert result.exit_code == 0, result.output
    sidecars = list(out.rglob("*.cxrtool.json"))
    assert len(sidecars) == len(inputs)
    mono1 = json.loads((out / "dicom" / "wg04" / "RG3_J2KR.dcm.cxrtool.json").read_text())
    assert mono1["view_position"] == "AP"


def test_runtime_choice_and_its_refusals(study, checkpoint, monkeypatch, tmp_path):
    import cxrtool.models.runtime as runtime

    pytest.importorskip("onnxruntime", reason="ONNX Runtime (cxrtool[onnx]) is not installed")
    monkeypatch.setenv("CXRTOOL_CACHE", str(tmp_path / "cache"))
    first = invoke(str(study), "-m", str(checkpoint), "-j", "0", "--runtime", "onnx", "--out", str(tmp_path / "a"))
    assert first.exit_code == 0 and "exporting tiny for ONNX Runtime, once" in first.output, first.output
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
    again = invoke(str(study), "-m", str(checkpoint), "-j", "0", "--runtime", "onnx", "--out", str(tmp_path / "b"))
    assert again.exit_code == 0 and "exporting" not in again.output  # exported once per model
    assert invoke(str(study), "-m", str(checkpoint), "--runtime", "tensorrt").exit_code == 2
    monkeypatch.setattr(runtime, "onnx_installed", lambda: False)
    refused = invoke(str(study), "-m", str(checkpoint), "-j", "0", "--runtime", "onnx", "--out", str(tmp_path / "c"))
    assert refused.exit_code == 2 and 'pip install "cxrtool[onnx]"' in refused.output
    fallback = invoke(str(study), "-m", str(checkpoint), "-j", "0", "--out", str(tmp_path / "d"))  # auto: PyTorch
    assert fallback.exit_code == 0 and "exporting" not in fallback.output


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_the_model_in_the_workers_or_here_gives_the_same_results(study, checkpoint, tmp_path, monkeypatch, command):
    """-j 1 on two cores takes the many-core path (the model here, one worker decoding);
    CXRTOOL_MODEL_IN=workers forces the other (the model inside the worker): same results,
    whichever path, and a study that fails is reported the same way."""
    (study / "broken.png").write_bytes(b"not a png")
    outputs = {}
    for place in ("main", "workers"):
        monkeypatch.setenv("CXRTOOL_MODEL_IN", place)
        out = tmp_path / place
        result = runner.invoke(app, [command, str(study), "-m", str(checkpoint), "-j", "1", "--out", str(out),
                                     *(["--finding", "Effusion"] if command == "explain" else [])])
        assert result.exit_code == 1, result.output  # the broken file, alone
        assert "broken.png" in result.output
        sidecars = {p.relative_to(out).as_posix(): json.loads(p.read_text()) for p in out.rglob("*.cxrtool.json")}
        assert len(sidecars) == 4
        outputs[place] = {name: {k: v["probability"] for k, v in record["results"][0]["findings"].items()}
                          for name, record in sidecars.items()}
        if command == "explain":
            assert len(list(out.rglob("*.overlay.png"))) == 4 and (out / "cxrtool_explain.html").is_file()
        rows = read_csv(out / FOLDER_CSV)
        assert {row["file"]: row["error"] != "" for row in rows} == {"a.png": False, "c.dcm": False, "noext": False,
                                                                      "broken.png": True}
    assert outputs["main"].keys() == outputs["workers"].keys()
    for name, probabilities in outputs["main"].items():
        assert probabilities == pytest.approx(outputs["workers"][name], abs=1e-5)
    monkeypatch.setenv("CXRTOOL_MODEL_IN", "gpu-please")
    refused = runner.invoke(app, [command, str(study), "-m", str(checkpoint), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "CXRTOOL_MODEL_IN" in refused.output


def test_an_output_stage_of_ones_own_sees_every_study_and_its_files_follow_the_result(study, checkpoint, tmp_path):
    """An output stage is one class and an OutputKind: it sees each study's outcome in order
    (done, skipped, failed); the files it lists in the result go when the result goes stale."""
    from cxrtool.errors import UsageError
    from cxrtool.predict import predict
    from cxrtool.stages import OutputKind

    seen: list[tuple[str, str]] = []

    class Notes:
        def study(self, outcome):
            seen.append((outcome.path.name, outcome.status))
            if outcome.result is not None:
                name = outcome.output_name("note.txt")
                (outcome.folder / name).write_text(f"{max(c.probability for c in outcome.result.findings.values()):.3f}")
                outcome.wrote("notes", [name])

        def finish(self):
            return []

    notes = OutputKind("notes", "a line per study", lambda context: Notes())
    (study / "broken.png").write_bytes(b"not a png")
    first = predict([study], model=checkpoint, workers=0, outputs=[notes])
    assert first.predicted == 4 and len(first.failed) == 1
    assert sorted(seen) == sorted([("a.png", "predicted"), ("b.png", "predicted"), ("c.dcm", "predicted"),
                                   ("noext", "predicted"), ("broken.png", "failed")])
    record = json.loads((study / "a.png.cxrtool.json").read_text())
    (note,) = record["results"][0]["outputs"]["notes"]
    assert (study / note).is_file()
    seen.clear()
    again = predict([study], model=checkpoint, workers=0, outputs=[notes])
    assert again.skipped == 4 and ("a.png", "skipped") in seen
    write_png(study / "a.png", seed=7)  # the study changes: its old result, and the note it lists, are stale
    (study / note).write_text("old")
    predict([study], model=checkpoint, workers=0)  # without the stage: nothing lists a note any more
    assert not (study / note).exists()
    assert "outputs" not in json.loads((study / "a.png.cxrtool.json").read_text())["results"][0]
    with pytest.raises(UsageError, match="no output stage 'nope'; the registered ones: sr"):
        predict([study], model=checkpoint, workers=0, outputs=["nope"])
