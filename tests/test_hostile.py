"""Hostile names, files and folders (issue 23): no hang, no traceback, nothing written where
it should not be, and what a spreadsheet or a browser opens cannot run anything."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_png
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.errors import EXIT_OUTPUT
from cxrtool.io.outputs import FOLDER_CSV, read_csv_rows, sidecar_path, spreadsheet_safe, spreadsheet_text

runner = CliRunner()
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "CXRTOOL_NO_PROGRESS": "1"}


@pytest.fixture
def study(tmp_path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    write_png(folder / "a.png")
    write_png(folder / "b.png", seed=1)
    return folder


def cxrtool(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cxrtool", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------ files that are not files


def test_a_fifo_and_a_device_are_refused_by_name_at_once(study, make_checkpoint):
    os.mkfifo(study / "p.dcm")  # no writer: reading it would block for ever
    result = cxrtool("predict", str(study), "/dev/zero", "-m", str(make_checkpoint()), "-j", "0", timeout=120)
    assert result.returncode == 1, result.stderr
    assert "p.dcm: not a regular file but a FIFO (named pipe)" in result.stderr
    assert "/dev/zero: not a regular file but a character device" in result.stderr
    assert "Traceback" not in result.stderr
    assert sidecar_path(study, "a.png").is_file() and sidecar_path(study, "b.png").is_file()


# ------------------------------------------------------------------ names


def test_long_names_are_shortened_with_a_digest_and_the_batch_is_whole(study, make_checkpoint):
    long_name = "x" * 241 + ".png"  # 245 bytes: its sidecar's name would pass the 255-byte limit
    long_stem = "y" * 224 + ".png"  # explain's picture names add about 52 bytes
    write_png(study / long_name, seed=2)
    write_png(study / long_stem, seed=3)
    checkpoint = str(make_checkpoint())
    predicted = cxrtool("predict", str(study), "-m", checkpoint, "-j", "0")
    assert predicted.returncode == 0, predicted.stderr
    sidecar = sidecar_path(study, long_name)
    assert sidecar.is_file() and len(sidecar.name.encode()) <= 255 and "~" in sidecar.name
    assert json.loads(sidecar.read_text())["file"] == long_name  # the record keeps the real name
    explained = cxrtool("explain", str(study), "-m", checkpoint, "-j", "0", "-f", "all", "--overlay-size", "128")
    assert explained.returncode == 0, explained.stderr
    assert all(len(p.name.encode()) <= 255 for p in study.iterdir())
    rows = {row["file"] for row in read_csv_rows(study / FOLDER_CSV)}
    assert rows == {"a.png", "b.png", long_name, long_stem}
    assert (study / "cxrtool_explain.html").is_file()
    again = cxrtool("predict", str(study), "-m", checkpoint, "-j", "0")  # and the long ones are found done
    assert again.returncode == 0 and "4 already done" in again.stderr.replace("\n", " "), again.stderr


def test_a_name_a_spreadsheet_would_run_is_written_as_text_and_read_back_as_it_is(study, make_checkpoint):
    for name in ("=1+2.png", "@SUM(A1).png", "+cmd.png"):
        write_png(study / name, seed=len(name))
    result = runner.invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0"])
    assert result.exit_code == 0, result.output
    text = (study / FOLDER_CSV).read_text()
    lines = text.splitlines()
    assert not any(line.startswith(("=", "+", "@")) for line in lines), text
    assert any(line.startswith("'=1+2.png,") for line in lines)
    assert {row["file"] for row in read_csv_rows(study / FOLDER_CSV)} == {"a.png", "b.png", "=1+2.png",
                                                                           "@SUM(A1).png", "+cmd.png"}
    assert all(float(row["Effusion"]) >= 0 for row in read_csv_rows(study / FOLDER_CSV))  # numbers stay numbers
    for value in ["=x", "-0.25", "-", "'=x", "''@y", "'plain", "\tx", ""]:
        assert spreadsheet_text(spreadsheet_safe(value)) == value
    assert spreadsheet_safe("-0.25") == "-0.25" and spreadsheet_safe("-x") == "'-x"


def test_a_name_that_is_a_script_is_a_relative_link_in_the_contact_sheet(study, make_checkpoint):
    name = "javascript:alert(document.domain)<!--.png"
    write_png(study / name, seed=5)
    result = runner.invoke(app, ["explain", str(study), "-m", str(make_checkpoint()), "-j", "0", "-f", "Effusion",
                                 "--overlay-size", "128"])
    assert result.exit_code == 0, result.output
    page = (study / "cxrtool_explain.html").read_text()
    assert "href='javascript" not in page and "src='javascript" not in page and "<!--" not in page
    assert "href='./javascript%3Aalert%28document.domain%29%3C%21--.png.cxrtool." in page
    assert "Content-Security-Policy" in page


# ------------------------------------------------------------------ where cxrtool writes


def test_a_journal_that_is_a_link_is_refused_not_followed(tmp_path, nih_dir):
    image = sorted((nih_dir / "images").glob("*.png"))[0]
    mask = tmp_path / "mask.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(mask), np.pad(np.ones((200, 200), np.uint8), 300))
    table = tmp_path / "masks.csv"
    table.write_text(f"image,mask\n{image},{mask}\n")
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere" / "written.jsonl"
    (out / "cxrtool_radiomics.csv.journal.jsonl").symlink_to(elsewhere)  # dangling: would be created
    result = cxrtool("radiomics", "--masks", str(table), "--out", str(out / "cxrtool_radiomics.csv"), "-j", "0")
    assert result.returncode == EXIT_OUTPUT, result.stderr
    assert "is a symbolic link" in result.stderr and "Traceback" not in result.stderr
    assert not elsewhere.exists() and not elsewhere.parent.exists()


def test_a_table_or_lock_that_is_a_link_is_refused(study, make_checkpoint, tmp_path):
    target = tmp_path / "target.csv"
    target.write_text("file,model,model_id\nsecret.png,m,0\n")
    (study / FOLDER_CSV).symlink_to(target)
    checkpoint = str(make_checkpoint())
    result = runner.invoke(app, ["predict", str(study), "-m", checkpoint, "-j", "0"])
    assert result.exit_code == EXIT_OUTPUT, result.output
    assert "is a symbolic link" in result.output
    assert target.read_text() == "file,model,model_id\nsecret.png,m,0\n"  # never merged, never written
    (study / FOLDER_CSV).unlink()
    (study / ".cxrtool.lock").unlink(missing_ok=True)
    (study / ".cxrtool.lock").symlink_to(tmp_path / "made-by-the-lock")
    locked = runner.invoke(app, ["predict", str(study), "-m", checkpoint, "-j", "0", "--overwrite"])
    assert locked.exit_code == EXIT_OUTPUT and "is a symbolic link" in locked.output
    assert not (tmp_path / "made-by-the-lock").exists()


def test_an_output_folder_that_cannot_be_written_is_said_once_before_the_model_loads(study, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["predict", str(study), "-m", str(tmp_path / "no-model.safetensors"),
                                 "--out", str(blocker / "out")])
    assert result.exit_code == EXIT_OUTPUT, result.output  # (the model is missing too: the folder is checked first)
    assert f"cannot write the results: {blocker / 'out'}" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_disk_that_fills_mid_run_ends_it_in_one_line_and_keeps_what_was_written(study, make_checkpoint,
                                                                                   monkeypatch):
    import cxrtool.io.outputs as outputs

    for k in range(4):
        write_png(study / f"c{k}.png", seed=10 + k)
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if str(target).endswith("c1.png.cxrtool.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(outputs.os, "replace", replace)
    result = runner.invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0", "-b", "1"])
    assert result.exit_code == EXIT_OUTPUT, result.output
    assert "c1.png.cxrtool.json: No space left on device" in result.output
    assert "Traceback" not in result.output
    for name in ("a.png", "b.png", "c0.png"):  # done before the disk filled: whole
        json.loads(sidecar_path(study, name).read_text())
    assert not sidecar_path(study, "c1.png").exists()
    assert not [p for p in study.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


# ------------------------------------------------------------------ crafted checkpoints


def _with_card(source: Path, target: Path, change) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cxrtool.models.card import CARD_KEY

    with safe_open(str(source), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        card = json.loads(handle.metadata()[CARD_KEY])
    save_file(tensors, str(target), metadata={CARD_KEY: json.dumps(change(card))})
    return target


@pytest.mark.parametrize(("change", "says"), [
    (lambda card: [card], "the model card is a list, not an object"),
    (lambda card: None, "the model card is null, not an object"),
    (lambda card: {**card, "format_version": "3"}, 'format_version is "3", not a whole number'),
    (lambda card: {**card, "thresholds": {"Effusion": "high"}}, 'threshold of "Effusion" is "high", not a probability'),
    (lambda card: {**card, "preprocessing": {**card["preprocessing"], "input_size": "64"}},
     'preprocessing.input_size is "64", not a whole number'),
    (lambda card: {**card, "preprocessing": {**card["preprocessing"], "input_size": 100000}},
     "preprocessing.input_size is 100000, not a whole number from 16 to 4096"),
    (lambda card: {**card, "preprocessing": {**card["preprocessing"], "std": 0}}, "preprocessing.std is 0, not positive"),
    (lambda card: {**card, "architecture": 42}, "architecture is 42, not a short text"),
    (lambda card: {**card, "findings": "Effusion"}, "findings must be a list"),
    (lambda card: {**card, "preprocessing": {**card["preprocessing"], "resize": "stretch"}}, "resize must be one of"),
])
def test_a_card_with_fields_of_the_wrong_type_is_refused_in_one_line_before_any_export(
        study, make_checkpoint, tmp_path, monkeypatch, change, says):
    monkeypatch.setenv("CXRTOOL_CACHE", str(tmp_path / "cache"))
    crafted = _with_card(make_checkpoint(), tmp_path / "crafted.safetensors", change)
    result = runner.invoke(app, ["predict", str(study), "-m", str(crafted), "-j", "0", "--runtime", "auto"])
    assert result.exit_code == 2, result.output
    assert says in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.onnx"))
    assert not sidecar_path(study, "a.png").exists()


def test_a_table_a_spreadsheet_saved_in_cp1252_is_refused_once_before_any_work(study, make_checkpoint):
    checkpoint = str(make_checkpoint())
    assert runner.invoke(app, ["predict", str(study), "-m", checkpoint, "-j", "0"]).exit_code == 0
    table = study / FOLDER_CSV
    table.write_bytes(table.read_text().replace("a.png", "a-café.png").encode("cp1252"))
    sidecars = {p: p.stat().st_mtime_ns for p in study.glob("*.cxrtool.json")}
    result = runner.invoke(app, ["predict", str(study), "-m", checkpoint, "-j", "0", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert f"{table}: not UTF-8 text (byte 0xe9" in result.output and "cp1252" in result.output
    assert "Traceback" not in result.output
    assert {p: p.stat().st_mtime_ns for p in study.glob("*.cxrtool.json")} == sidecars  # nothing done, nothing lost


def test_a_study_named_like_an_output_is_a_study_and_what_is_passed_over_is_counted(study, make_checkpoint):
    write_png(study / "patient.cxrtool.png", seed=6)  # ".cxrtool." alone does not make an output
    write_png(study / "roc_curves.png", seed=7)  # no evaluation report beside it: a study
    (study / "notes.txt").write_text("not an image")
    result = runner.invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0"])
    assert result.exit_code == 0, result.output
    files = {row["file"] for row in read_csv_rows(study / FOLDER_CSV)}
    assert {"patient.cxrtool.png", "roc_curves.png"} <= files
    assert "passed over in the folders: 1 not an image" in result.output
    again = runner.invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0"])
    assert "4 already done" in " ".join(again.output.split())
    assert "cxrtool's own outputs" in again.output  # the sidecars of the first run, counted, not read as studies


# ------------------------------------------------------------------ load: eight runs at once on one folder


@pytest.mark.slow
def test_eight_runs_at_once_on_one_folder_leave_every_result_once_and_whole_tables(tmp_path, nih_dir, make_checkpoint):
    """Three predicts (two models), three explains, two radiomics runs into one folder, all
    at once: every (study, model) row once, every sidecar with both models' results and
    the explained model's maps, the radiomics table with every region once."""
    import shutil
    import textwrap

    folder = tmp_path / "shared"
    folder.mkdir()
    pngs = sorted((nih_dir / "images").glob("*.png"))[:8]
    for png in pngs:
        shutil.copy(png, folder / png.name)
    first, second = make_checkpoint(), make_checkpoint(name="second", seed=1)
    table = folder / "cxrtool_radiomics.csv"
    measure = textwrap.dedent("""
        import sys
        from cxrtool.radiomics.batch import run_regions
        from cxrtool.radiomics.sources import RegionJob
        params = {"imageType": {"Original": {}}, "featureClass": {"firstorder": None}, "setting": {"binWidth": 0.02}}
        run_regions([RegionJob(path) for path in sys.argv[2:]], sys.argv[1], params=params, workers=0)
    """)
    names = [str(folder / p.name) for p in pngs]
    commands = [
        ["-m", "cxrtool", "predict", str(folder), "-m", str(first), "-j", "0", "-b", "2"],
        ["-m", "cxrtool", "predict", str(folder), "-m", str(second), "-j", "0", "-b", "3"],
        ["-m", "cxrtool", "predict", *names[:4], "-m", str(first), "-j", "0"],
        ["-m", "cxrtool", "explain", str(folder), "-m", str(first), "-j", "0", "-f", "Effusion", "--overlay-size", "96"],
        ["-m", "cxrtool", "explain", *names[4:], "-m", str(first), "-j", "0", "-f", "Effusion", "--overlay-size", "96"],
        ["-m", "cxrtool", "explain", *names[::2], "-m", str(first), "-j", "0", "-f", "Effusion", "--overlay-size", "96"],
        ["-c", measure, str(table), *names[:5]],
        ["-c", measure, str(table), *names[3:]],
    ]
    runs = [subprocess.Popen([sys.executable, *command], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for command in commands]
    for process in runs:
        _, errors = process.communicate(timeout=600)
        assert process.returncode == 0, errors
    rows = read_csv_rows(folder / FOLDER_CSV)
    pairs = sorted((row["file"], row["model"]) for row in rows)
    assert pairs == sorted((p.name, model) for p in pngs for model in ("tiny", "second")), pairs
    for png in pngs:
        record = json.loads(sidecar_path(folder, png.name).read_text())
        by_model = {result["model"]["name"]: result for result in record["results"]}
        assert set(by_model) == {"tiny", "second"}
        assert "Effusion" in by_model["tiny"]["explanations"]["findings"]
        for name in by_model["tiny"]["explanations"]["findings"]["Effusion"].get("files", {}).values():
            assert (folder / name).is_file()
    measured = read_csv_rows(table)
    assert sorted(row["image"] for row in measured) == sorted(names) and all(row["status"] == "ok" for row in measured)
    assert (folder / "cxrtool_explain.html").is_file()


def test_an_interrupted_overwrite_says_to_resume_without_it(study, make_checkpoint, monkeypatch):
    import cxrtool.predict

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cxrtool.predict, "predict", interrupted)
    checkpoint = str(make_checkpoint())
    again = runner.invoke(app, ["predict", str(study), "-m", checkpoint, "--overwrite"])
    assert again.exit_code == 130 and "run the same command without --overwrite to resume" in again.output
    plain = runner.invoke(app, ["predict", str(study), "-m", checkpoint])
    assert plain.exit_code == 130 and "run the same command again to resume" in plain.output
