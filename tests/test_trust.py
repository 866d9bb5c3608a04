"""Results a clinician can trust: never stale, never lost, never credited to the wrong model.

Each test here failed on the first release (issue 9's problems 1 to 9), and checks the fix
at the shared mechanism: one notion of "already done" (file content, model, settings), one
writer of shared folder tables, sidecars that keep every model's result.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_generic_dataset, write_seg
from typer.testing import CliRunner

from cxrtool.cli import app
from cxrtool.io.outputs import FOLDER_CSV, FOLDER_JSON

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def sidecar(folder: Path, name: str) -> dict:
    return json.loads((folder / f"{name}.cxrtool.json").read_text())


def jsonl(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


@pytest.fixture
def study(tmp_path, nih_dir) -> Path:
    """Four real NIH radiographs."""
    folder = tmp_path / "study"
    folder.mkdir()
    for png in sorted((nih_dir / "images").glob("*.png"))[:4]:
        shutil.copy(png, folder / png.name)
    return folder


def run(*args: str, env: dict | None = None, timeout: float = 240, cwd: Path | None = None, **kwargs):
    """The real command in a fresh process (stderr not a terminal, as under a scheduler)."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cxrtool", *args], capture_output=True, text=True, timeout=timeout,
                          env=environment, cwd=cwd or REPO, **kwargs)


# ------------------------------------------------------------------ 1. a changed study is done again


def test_a_changed_study_is_predicted_again_and_its_stale_results_go(study, nih_dir, make_checkpoint):
    a, b = make_checkpoint(name="a", seed=1), make_checkpoint(("Edema",), name="b", seed=2)
    target = sorted(study.iterdir())[0]
    assert runner.invoke(app, ["predict", str(study), "-m", str(a), "-j", "0"]).exit_code == 0
    # (Eigen-CAM: a random model's Grad-CAM may be zero, leaving no pictures to check)
    assert runner.invoke(app, ["explain", str(target), "-m", str(b), "-f", "Edema", "--cam", "eigencam",
                               "-j", "0"]).exit_code == 0
    before = sidecar(study, target.name)
    assert len(before["results"]) == 2
    pictures = [study / name for name in before["results"][1]["explanations"]["findings"]["Edema"]["files"].values()]
    assert all(p.is_file() for p in pictures)
    # the radiograph is replaced by another one: same name, other content
    replacement = sorted((nih_dir / "images").glob("*.png"))[10]
    shutil.copy(replacement, target)
    result = runner.invoke(app, ["predict", str(study), "-m", str(a), "-j", "0", "--jsonl"])
    assert result.exit_code == 0, result.output
    statuses = {Path(r["path"]).name: r["status"] for r in jsonl(result.stdout)}
    assert statuses[target.name] == "predicted" and list(statuses.values()).count("skipped") == 3
    after = sidecar(study, target.name)
    assert after["sha256"] != before["sha256"]
    probability = after["results"][0]["findings"]["Effusion"]["probability"]
    assert probability != before["results"][0]["findings"]["Effusion"]["probability"]
    # model b's result described the old file: gone from the sidecar, the table and the disk
    assert [r["model"]["name"] for r in after["results"]] == ["a"]
    assert not any(p.exists() for p in pictures)
    rows = [row for row in read_csv(study / FOLDER_CSV) if row["file"] == target.name]
    assert [row["model"] for row in rows] == ["a"] and float(rows[0]["Effusion"]) == pytest.approx(probability, abs=1e-6)
    assert "described the old files" in result.output
    # touching a file (same content) is not a change
    os.utime(target)
    again = runner.invoke(app, ["predict", str(study), "-m", str(a), "-j", "0"])
    assert "0 predicted, 4 already done" in again.output


def test_a_changed_study_is_explained_again(study, nih_dir, make_checkpoint):
    model = make_checkpoint()
    args = ["explain", str(study), "-m", str(model), "-f", "Effusion", "--cam", "eigencam", "-j", "0"]
    assert runner.invoke(app, args).exit_code == 0
    target = sorted(study.iterdir())[1]
    old_map = study / sidecar(study, target.name)["results"][0]["explanations"]["findings"]["Effusion"]["files"]["map"]
    old_pixels = old_map.read_bytes()
    shutil.copy(sorted((nih_dir / "images").glob("*.png"))[11], target)
    result = runner.invoke(app, args)
    assert "1 explained, 3 already done" in result.output, result.output
    assert old_map.read_bytes() != old_pixels  # the map is the new radiograph's


def test_a_changed_image_or_mask_is_measured_again(tmp_path, nih_dir):
    import cv2

    from cxrtool.radiomics.batch import run_regions
    from cxrtool.radiomics.sources import RegionJob

    pngs = sorted((nih_dir / "images").glob("*.png"))
    image, mask = tmp_path / "chest.png", tmp_path / "chest.mask.png"
    shutil.copy(pngs[0], image)
    square = np.zeros((1024, 1024), np.uint8)
    square[300:500, 300:500] = 1
    cv2.imwrite(str(mask), square)
    params = {"imageType": {"Original": {}}, "featureClass": {"firstorder": None}, "setting": {"binWidth": 0.02}}
    table = tmp_path / "radiomics.csv"
    jobs = [RegionJob(str(image), str(mask))]
    first = run_regions(jobs, table, params=params, workers=1)
    mean = float(read_csv(table)[0]["original_firstorder_Mean"])
    assert first.measured == 1 and run_regions(jobs, table, params=params, workers=1).measured == 0
    shutil.copy(pngs[5], image)  # another radiograph under the same name
    changed = run_regions(jobs, table, params=params, workers=1)
    assert (changed.measured, changed.changed) == (1, 1)
    new_mean = float(read_csv(table)[0]["original_firstorder_Mean"])
    assert new_mean != mean
    square[:] = 0
    square[100:150, 600:700] = 1  # another region drawn in the same mask file
    cv2.imwrite(str(mask), square)
    moved = run_regions(jobs, table, params=params, workers=1)
    assert moved.measured == 1 and float(read_csv(table)[0]["original_firstorder_Mean"]) != new_mean


# ------------------------------------------------------------------ 2. one model never erases another's


def test_results_of_another_model_stay_intact_and_attributed(study, make_checkpoint, tmp_path):
    from cxrtool.evaluate import evaluate

    a = make_checkpoint(("Effusion", "Nodule"), name="model-a", seed=1)
    b = make_checkpoint(("Edema", "Hernia", "Effusion"), name="model-b", seed=2)
    assert runner.invoke(app, ["predict", str(study), "-m", str(a), "-j", "0"]).exit_code == 0
    rows_a = read_csv(study / FOLDER_CSV)
    assert runner.invoke(app, ["predict", str(study), "-m", str(b), "-j", "0"]).exit_code == 0
    rows = read_csv(study / FOLDER_CSV)
    assert len(rows) == 8 and {row["model"] for row in rows} == {"model-a", "model-b"}
    for before in rows_a:  # model a's rows: same values, still credited to model a
        now = next(r for r in rows if r["file"] == before["file"] and r["model"] == "model-a")
        assert (now["Effusion"], now["Nodule"], now["model_id"]) == (before["Effusion"], before["Nodule"], before["model_id"])
        assert now["Edema"] == "" and now["Hernia"] == ""
    index = json.loads((study / FOLDER_JSON).read_text())["models"]
    assert sorted(entry["name"] for entry in index.values()) == ["model-a", "model-b"]
    assert sorted(index[rows_a[0]["model_id"]]["findings"]) == ["Effusion", "Nodule"]
    one = sidecar(study, rows[0]["file"])
    assert sorted(r["model"]["name"] for r in one["results"]) == ["model-a", "model-b"]
    # evaluate scores one model's rows, and asks which when there are several
    labels = tmp_path / "labels.csv"
    names = sorted(p.name for p in study.glob("*.png"))
    labels.write_text("path,Effusion,Edema\n" + "".join(f"{n},{i % 2},{(i // 2) % 2}\n" for i, n in enumerate(names)))
    with pytest.raises(ValueError, match="rows of 2 models: .*choose one"):
        evaluate(study / FOLDER_CSV, labels, n_boot=0)
    report = evaluate(study / FOLDER_CSV, labels, model="model-b", n_boot=0)
    assert [f.finding for f in report.findings] == ["Effusion", "Edema"] and report.matching["matched"] == 4
    assert report.settings["model"]["name"] == "model-b"
    by_file = evaluate(study / FOLDER_CSV, labels, model=a, n_boot=0)  # a checkpoint chooses its own rows
    assert [f.finding for f in by_file.findings] == ["Effusion"] and by_file.settings["model"]["name"] == "model-a"
    cli = runner.invoke(app, ["evaluate", str(study / FOLDER_CSV), "--labels", str(labels), "--bootstrap", "0"])
    assert cli.exit_code == 2 and "choose one with --model" in cli.output


# ------------------------------------------------------------------ 3. concurrent runs lose no rows


def test_concurrent_runs_into_one_folder_keep_every_row(tmp_path, nih_dir, make_checkpoint):
    model = make_checkpoint()
    folder = tmp_path / "shared"
    folder.mkdir()
    pngs = sorted((nih_dir / "images").glob("*.png"))[:20]
    for i, png in enumerate(pngs):
        shutil.copy(png, folder / f"{'a' if i % 2 else 'b'}{i:02d}.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CXRTOOL_NO_PROGRESS": "1"}
    runs = [subprocess.Popen([sys.executable, "-m", "cxrtool", "predict", str(folder / f"{half}*.png"), "-m", str(model),
                              "-j", "0", "-b", "2"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for half in ("a", "b")]
    for process in runs:
        _, errors = process.communicate(timeout=240)
        assert process.returncode == 0, errors
    rows = read_csv(folder / FOLDER_CSV)
    assert sorted(row["file"] for row in rows) == sorted(p.name for p in folder.glob("*.png"))
    assert all(row["Effusion"] for row in rows)


def test_shared_table_merges_what_other_writers_flushed(tmp_path):
    from cxrtool.io.outputs import SharedTable

    path = tmp_path / "t.csv"
    first, second = SharedTable(path, ("file",)), SharedTable(path, ("file",))
    first.put({"file": "a", "x": 1.0})
    second.put({"file": "b", "y": 2.0})
    first.flush()
    second.flush()  # written after first: first's row must survive
    first.put({"file": "a", "x": 3.0})
    first.drop(lambda row: row["file"] == "nothing")
    first.flush()
    rows = read_csv(path)
    assert [(r["file"], r["x"], r["y"]) for r in rows] == [("a", "3.000000", ""), ("b", "", "2.000000")]


def test_concurrent_radiomics_runs_into_one_table_keep_every_row(tmp_path, nih_dir):
    pngs = sorted((nih_dir / "images").glob("*.png"))[:6]
    table = tmp_path / "radiomics.csv"
    script = textwrap.dedent("""
        import sys
        from cxrtool.radiomics.batch import run_regions
        from cxrtool.radiomics.sources import RegionJob
        params = {"imageType": {"Original": {}}, "featureClass": {"firstorder": None}, "setting": {"binWidth": 0.02}}
        run_regions([RegionJob(path) for path in sys.argv[2:]], sys.argv[1], params=params, workers=1)
    """)
    runs = [subprocess.Popen([sys.executable, "-c", script, str(table), *map(str, half)])
            for half in (pngs[:3], pngs[3:])]
    assert all(process.wait(timeout=240) == 0 for process in runs)
    rows = read_csv(table)
    assert sorted(row["image"] for row in rows) == sorted(map(str, pngs)) and all(row["status"] == "ok" for row in rows)


# ------------------------------------------------------------------ 4. every worker count, and a host that used torch


@pytest.mark.parametrize("workers", ["0", "1", "2", "3"])
def test_every_worker_count_finishes(study, make_checkpoint, workers):
    result = run("predict", str(study), "-m", str(make_checkpoint()), "-j", workers, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "4 predicted" in result.stderr


def test_a_host_process_that_used_torch_on_several_threads_can_predict(study, make_checkpoint, tmp_path):
    script = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(2)
        x = torch.randn(8, 64, 128, 128)
        torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3), padding=1)  # OpenMP's pool is now running
        from cxrtool.predict import predict
        for workers in (1, 2, 3):
            summary = predict([{str(study)!r}], model={str(make_checkpoint())!r}, workers=workers, overwrite=True)
            assert summary.predicted == 4, summary
        assert torch.get_num_threads() == 2  # the host's setting is given back
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "CXRTOOL_NO_PROGRESS": "1"})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ------------------------------------------------------------------ 5. a non-finite output fails its study alone


def test_a_nan_output_fails_that_study_and_the_batch_goes_on(study, make_checkpoint, monkeypatch):
    from cxrtool.models.scoring import CheckpointScorer

    real = CheckpointScorer.probabilities

    def second_is_nan(scorer, tensors):
        scores = real(scorer, tensors)
        scores[min(1, len(scores) - 1), 0] = np.nan
        return scores

    monkeypatch.setattr(CheckpointScorer, "probabilities", second_is_nan)
    result = runner.invoke(app, ["predict", str(study), "-m", str(make_checkpoint()), "-j", "0", "-b", "8"])
    assert result.exit_code == 1, result.output
    rows = read_csv(study / FOLDER_CSV)
    failed = [row for row in rows if row["error"]]
    assert len(rows) == 4 and len(failed) == 1
    assert "not a finite number for 1 of 3 findings: Effusion (nan)" in failed[0]["error"]
    assert not (study / f"{failed[0]['file']}.cxrtool.json").exists()
    assert "3 predicted, 0 already done, 1 failed" in result.output


# ------------------------------------------------------------------ 6. imports in any order; the umask untouched


@pytest.mark.parametrize("code", [
    "from cxrtool.explain.render import overlay; import numpy as np; "
    "overlay(np.zeros((64, 64), np.uint8), np.ones((64, 64), np.float32), 'x', [[1, 1, 8, 8]], 1.0)",
    "import cxrtool; import pytorch_grad_cam; from pytorch_grad_cam import GradCAM",
    "import cxrtool; import timm; timm.create_model('resnet18', num_classes=2)",
    "import cxrtool.io.studies; import torchvision; import torchvision.transforms",
    "import cxrtool, sys; assert 'torch' not in sys.modules",  # still import-light
])
def test_public_functions_work_in_a_fresh_process_whatever_the_import_order(code):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_outputs_get_the_permissions_of_the_users_umask(tmp_path, nih_dir):
    png = sorted((nih_dir / "images").glob("*.png"))[0]
    script = textwrap.dedent(f"""
        import os
        os.umask(0o027)
        real_umask = os.umask
        def no_changes(mask):
            raise AssertionError("cxrtool changed the umask")
        os.umask = no_changes
        import torch
        from cxrtool.models.checkpoint import ModelCard, save_checkpoint
        from cxrtool.models.network import CXRClassifier
        from cxrtool.predict import predict
        from cxrtool.preprocess import Preprocessing
        checkpoint = save_checkpoint({str(tmp_path / 'm.safetensors')!r}, CXRClassifier("resnet18", ["Effusion"]),
                                     ModelCard("resnet18", ["Effusion"], Preprocessing(input_size=64).to_dict()))
        predict([{str(png)!r}], model=checkpoint, out={str(tmp_path / 'out')!r}, workers=0)
        os.umask = real_umask
        assert os.umask(0o027) == 0o027
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                            env={**os.environ, "CXRTOOL_NO_PROGRESS": "1"})
    assert result.returncode == 0, result.stderr
    for path in [tmp_path / "m.safetensors", *(tmp_path / "out").iterdir()]:
        if not path.name.startswith("."):
            assert path.stat().st_mode & 0o777 == 0o640, path


# ------------------------------------------------------------------ 7. logs, not a terminal


@pytest.mark.slow
def test_long_work_under_a_pipe_prints_progress_lines_and_whole_tables(tmp_path):
    labels = make_generic_dataset(tmp_path / "data", n=32)
    env = {"CXRTOOL_PROGRESS_INTERVAL": "0", "CXRTOOL_NO_PROGRESS": "0", "COLUMNS": ""}
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "COLUMNS"}
    trained = subprocess.run([sys.executable, "-m", "cxrtool", "train", str(labels), "--out", str(tmp_path / "run"),
                              "--arch", "resnet18", "--input-size", "32", "-b", "8", "-j", "0", "--epochs", "2",
                              "--device", "cpu"], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    lines = trained.stderr.splitlines()
    assert any(line.startswith("epoch 1/2: 2/3 (67%), loss ") and "/s, 0:00:0" in line for line in lines), trained.stderr
    assert any(line.startswith("epoch 2/2: loss ") and "val mean AUROC" in line for line in lines)
    assert "\x1b[" not in trained.stderr and "━" not in trained.stderr  # no bars, no cursor codes
    predicted = subprocess.run([sys.executable, "-m", "cxrtool", "predict", str(tmp_path / "data"), "-m",
                                str(tmp_path / "run" / "model.safetensors"), "-j", "0"], capture_output=True, text=True,
                               timeout=240, env=env)
    assert predicted.returncode == 0 and "predict: 32/32 (100%)" in predicted.stderr, predicted.stderr
    evaluated = subprocess.run([sys.executable, "-m", "cxrtool", "evaluate", str(tmp_path / "data" / FOLDER_CSV),
                                "--labels", str(labels), "--bootstrap", "50"], capture_output=True, text=True,
                               timeout=240, env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "…" not in evaluated.stdout and "AUROC [95% CI]" in evaluated.stdout
    import re

    (disk,) = [line for line in evaluated.stdout.splitlines() if "Disk" in line]
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}–\d\.\d{3}\]", disk) and disk.count("│") == 10, evaluated.stdout


def test_a_slow_start_does_not_make_the_time_left_hours(monkeypatch):
    """The rate behind "time left" is measured from the first finished item: loading a model
    or exporting a graph before it is not spread over the rest of the run."""
    import io
    import time

    from rich.console import Console

    from cxrtool.cli import _console

    out = io.StringIO()
    bar = _console.PlainProgress(Console(file=out, width=200), interval=0)
    start = time.monotonic()
    task = bar.add_task("predict", total=300)
    monkeypatch.setattr(_console.time, "monotonic", lambda: start + 40.0)
    bar.update(task, completed=1)  # 40 s of start-up: no rate yet, so no guess of the time left
    monkeypatch.setattr(_console.time, "monotonic", lambda: start + 41.0)
    bar.update(task, completed=2)  # then 1 a second since the first
    lines = out.getvalue().splitlines()
    assert lines[0] == "predict: 1/300 (0%)"
    assert lines[1] == "predict: 2/300 (1%), 1/s, 0:04:58 left"


# ------------------------------------------------------------------ 8. explain --out, then radiomics


def test_radiomics_measures_what_explain_wrote_under_out(study, make_checkpoint, tmp_path):
    model = make_checkpoint()
    out = tmp_path / "explained"
    assert runner.invoke(app, ["explain", str(study), "-m", str(model), "-f", "Effusion", "--out", str(out),
                               "--cam", "eigencam", "-j", "0"]).exit_code == 0
    params = tmp_path / "params.yaml"
    params.write_text("imageType:\n  Original: {}\nfeatureClass:\n  firstorder:\nsetting:\n  binWidth: 0.02\n")
    expected = sum(len(json.loads(p.read_text())["results"][0]["explanations"]["findings"]["Effusion"]["regions"])
                   for p in out.glob("*.cxrtool.json"))
    for extra in ([str(study)], []):  # with the studies, or from the explanations alone
        table = tmp_path / f"radiomics{len(extra)}.csv"
        # a random network's maps land anywhere: every region, on the chest or not
        result = runner.invoke(app, ["radiomics", *extra, "--explanations", str(out), "--params", str(params),
                                     "--out", str(table), "-j", "1", "--include-off-chest"])
        assert result.exit_code == 0, result.output
        rows = read_csv(table)
        assert expected > 0 and len(rows) == expected and {row["finding"] for row in rows} == {"Effusion"}
        assert all(Path(row["image"]).resolve().parent == study.resolve() for row in rows)
        assert all(row["model"] for row in rows)
    nothing = runner.invoke(app, ["radiomics", str(study), "--from-cam"])  # beside the studies: there are none
    assert nothing.exit_code == 2 and "--explanations" in nothing.output


# ------------------------------------------------------------------ 9. reasons that say what a file is


def test_reasons_say_what_a_file_is_and_warnings_do_not_leak(tmp_path, dicom_dir, make_checkpoint):
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report.dcm")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(folder / "pixel.png")
    data = (dicom_dir / "wg04" / "RG2_J2KR.dcm").read_bytes()
    (folder / "cut.dcm").write_bytes(data[: len(data) // 2])
    shutil.copy(dicom_dir / "wg04" / "RG2_UNC.dcm", folder / "good.dcm")
    assert pydicom.dcmread(folder / "report.dcm").Modality == "SR"
    result = run("predict", str(folder), "-m", str(make_checkpoint()), "-j", "0", env={"CXRTOOL_NO_PROGRESS": "1"})
    assert result.returncode == 1, result.stderr
    reasons = {row["file"]: row["error"] for row in read_csv(folder / FOLDER_CSV)}
    assert reasons["good.dcm"] == ""
    assert reasons["report.dcm"].startswith("DICOM without pixel data: a structured report (SOP Class: Comprehensive SR")
    assert reasons["pixel.png"] == "image too small to be a radiograph: 1 x 1 pixels (the minimum is 32 x 32)"
    assert "End of file reached" in reasons["cut.dcm"]
    assert "Warning" not in result.stderr and "warnings.warn" not in result.stderr, result.stderr


# ------------------------------------------------------------------ killed mid-batch: nothing torn, nothing lost


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_a_run_killed_mid_batch_leaves_whole_files_and_resumes(tmp_path, nih_dir, make_checkpoint, command):
    import signal

    import cv2

    folder = tmp_path / "study"
    folder.mkdir()
    pngs = sorted((nih_dir / "images").glob("*.png"))[:40]
    for png in pngs:
        shutil.copy(png, folder / png.name)
    checkpoint = make_checkpoint()
    args = [sys.executable, "-m", "cxrtool", command, str(folder), "-m", str(checkpoint), "-j", "2", "-b", "2"]
    if command == "explain":
        args += ["-f", "Effusion", "--cam", "eigencam", "--overlay-size", "128"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CXRTOOL_NO_PROGRESS": "1"}
    # The run kills itself (and its workers: its whole process group) when its fifth study
    # is done, in the middle of its third batch of two: whatever the machine's speed.
    settings = ("settings=ExplainSettings(method='eigencam', findings=('Effusion',), display_size=128), "
                if command == "explain" else "")
    killer = f"""
import os, signal
from cxrtool.explain.run import ExplainSettings, explain
from cxrtool.predict import predict
done = 0
def on_result(record):
    global done
    done += 1
    if done == 5:
        os.killpg(os.getpgrp(), signal.SIGKILL)
{command}([{str(folder)!r}], model={str(checkpoint)!r}, workers=2, batch_size=2, {settings}on_result=on_result)
raise SystemExit("not killed")
"""
    process = subprocess.run([sys.executable, "-c", killer], env=env, capture_output=True, text=True, timeout=240,
                             start_new_session=True)
    assert process.returncode == -signal.SIGKILL, process.stderr
    done = len(list(folder.glob("*.cxrtool.json")))
    assert done == 5, "the run was killed with five studies done, in the middle of a batch"
    for path in folder.iterdir():  # every result left is whole
        if path.name.startswith(".") or path.suffix == ".png" and ".cxrtool." not in path.name:
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".csv":
            rows = read_csv(path)
            assert all(len(row) == len(rows[0]) and None not in row.values() for row in rows)
        elif path.suffix == ".png":
            assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED) is not None, path
    again = subprocess.run(args + ["--jsonl"], env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    statuses = [record["status"] for record in jsonl(again.stdout)]
    assert statuses.count("skipped") == done and len(statuses) == len(pngs)
    rows = read_csv(folder / FOLDER_CSV)
    assert sorted(row["file"] for row in rows) == sorted(p.name for p in pngs) and all(row["Effusion"] for row in rows)
    assert len(list(folder.glob("*.cxrtool.json"))) == len(pngs)


# ------------------------------------------------------------------ what a real archive holds, sooner or later


def _dicom(path: Path, pixels: np.ndarray, **attributes) -> Path:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ViewPosition = "DX", "PA"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_every_kind_of_file_an_archive_holds_is_read_or_refused_by_name(tmp_path, dicom_dir, make_checkpoint):
    import struct
    import zlib

    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    folder = tmp_path / "archive"
    (folder / "Ünïcødé folder").mkdir(parents=True)
    rng = np.random.default_rng(0)
    grey = (rng.random((96, 80)) * 255).astype(np.uint8)
    good: dict[str, str] = {}  # file -> why it must be read
    bad: dict[str, str] = {}  # file -> the reason (a pattern) it is refused with
    # read correctly
    Image.fromarray(grey).save(folder / "Ünïcødé folder" / "chest x-ray 1.png")
    good["chest x-ray 1.png"] = "unicode and spaces in the path"
    Image.fromarray(np.stack([grey, grey // 2, 255 - grey], axis=2)).save(folder / "colour.png")
    good["colour.png"] = "colour PNG, read as luminance"
    shutil.copy(dicom_dir / "wg04" / "RG3_UNC.dcm", folder / "mono1.dcm")
    good["mono1.dcm"] = "MONOCHROME1"
    shutil.copy(dicom_dir / "wg04" / "RG2_JLSL.dcm", folder / "1.2.840.113619.2.55.3.604688")
    good["1.2.840.113619.2.55.3.604688"] = "DICOM without an extension"
    lut = _dicom(folder / "luts.dcm", (rng.random((64, 64)) * 1000).astype(np.uint16))
    ds = pydicom.dcmread(lut)
    modality = Dataset()
    modality.LUTDescriptor, modality.ModalityLUTType = [1024, 0, 16], "US"
    modality.LUTData = list(range(0, 2048, 2))
    modality["LUTData"].VR = "US"
    voi = Dataset()
    voi.LUTDescriptor = [2048, 0, 12]
    voi.LUTData = [min(4095, 2 * v) for v in range(2048)]
    voi["LUTData"].VR = "US"
    ds.ModalityLUTSequence, ds.VOILUTSequence = Sequence([modality]), Sequence([voi])
    ds.save_as(lut)
    good["luts.dcm"] = "modality and VOI LUT sequences"
    # refused, saying what they are
    shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report.dcm")
    bad["report.dcm"] = r"^DICOM without pixel data: a structured report \(SOP Class: Comprehensive SR Storage"

    write_seg(folder / "mask.dcm", dicom_dir / "wg04" / "RG2_UNC.dcm", [("Nodule", (10, 10, 20, 20))])
    bad["mask.dcm"] = r"^a DICOM Segmentation \(SEG\), not a radiograph"
    multi = _dicom(folder / "multi.dcm", np.zeros((2, 64, 64)).reshape(128, 64))
    ds = pydicom.dcmread(multi)
    ds.Rows, ds.NumberOfFrames = 64, 2
    ds.save_as(multi)
    bad["multi.dcm"] = r"^multi-frame DICOM \(2 frames\) is not a single radiograph"
    data = (dicom_dir / "wg04" / "RG2_UNC.dcm").read_bytes()
    (folder / "truncated.dcm").write_bytes(data[: len(data) // 3])
    bad["truncated.dcm"] = r"^truncated or corrupt pixel data \(Explicit VR Little Endian\): only \d+ of \d+ bytes"
    (folder / "empty.png").write_bytes(b"")
    bad["empty.png"] = r"^empty file$"
    (folder / "random.dcm").write_bytes(rng.bytes(4096))
    bad["random.dcm"] = r"^not a DICOM, PNG or JPEG file$"
    (folder / "notes.png").write_text("this is a text file, whatever its name says\n")
    bad["notes.png"] = r"^not a DICOM, PNG or JPEG file$"
    bomb = _dicom(folder / "header_bomb.dcm", np.zeros((64, 64)))
    ds = pydicom.dcmread(bomb)
    ds.Rows = ds.Columns = 60000
    ds.save_as(bomb)
    bad["header_bomb.dcm"] = r"^image too large: 60000 x 60000 pixels"
    header = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    (folder / "png_bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                           + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + _png_chunk(b"IEND", b""))
    bad["png_bomb.png"] = r"^image too large.*decompression bomb"
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(folder / "pixel.png")
    bad["pixel.png"] = r"^image too small to be a radiograph: 1 x 1 pixels"

    result = run("predict", str(folder), "-m", str(make_checkpoint()), "-j", "2", env={"CXRTOOL_NO_PROGRESS": "1"})
    assert result.returncode == 1, result.stderr
    rows = {row["file"]: row for folder_csv in folder.rglob(FOLDER_CSV) for row in read_csv(folder_csv)}
    assert set(rows) == set(good) | set(bad), sorted(rows)
    for name, why in good.items():
        assert rows[name]["error"] == "" and rows[name]["Effusion"], (name, why, rows[name]["error"])
    import re

    for name, reason in bad.items():
        assert re.search(reason, rows[name]["error"]), (name, rows[name]["error"])
        assert f"failed {folder}" in result.stderr and name in result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr


# ------------------------------------------------------------------ golden: predict = the model on the shared preprocessing


@pytest.mark.parametrize(("workers", "runtime"), [(0, "torch"), (2, "torch"), (2, "onnx")])
def test_predict_equals_the_model_on_the_shared_reading_and_preprocessing(nih_dir, dicom_dir, make_checkpoint, tmp_path,
                                                                         workers, runtime):
    import torch

    from cxrtool.io.studies import read_study
    from cxrtool.models.checkpoint import load_checkpoint
    from cxrtool.predict import predict
    from cxrtool.preprocess import Preprocessing, prepare

    checkpoint = make_checkpoint(seed=5)
    inputs = sorted((nih_dir / "images").glob("*.png"))[:6] + sorted(dicom_dir.rglob("*.dcm"))
    records: dict[str, dict] = {}
    if runtime == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX Runtime (cxrtool[onnx]) is not installed")
    summary = predict(inputs, model=checkpoint, out=tmp_path / f"out{workers}", workers=workers, batch_size=4,
                      runtime=runtime, on_result=lambda record: records.__setitem__(record["path"], record))
    assert summary.predicted == len(inputs)
    network, card = load_checkpoint(checkpoint)
    prep = Preprocessing.from_dict(card.preprocessing)
    for path in inputs:
        tensor, _ = prepare(read_study(path).pixels, prep)
        with torch.no_grad():
            expected = torch.sigmoid(network(torch.from_numpy(tensor)[None]))[0].numpy()
        got = [records[str(path)]["findings"][name]["probability"] for name in card.findings]
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0, err_msg=str(path))
