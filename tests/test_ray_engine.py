"""The Ray engine (issue 25): predict, explain and radiomics on a real two-node Ray cluster
started on this machine (a head and a worker, ``ray start``, one CPU each, on 127.0.0.1,
stopped after), against the local engine on copies of the same studies:
the same files (equal sidecars apart from when they were made; equal tables), work on both
nodes (recorded), a worker node killed mid-run: the run finishes on the other node, and a
re-run completes with nothing lost and nothing done twice."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine needs Ray (cxrtool[ray], in the test extra)")

FINDINGS = ("Effusion", "Nodule", "Cardiomegaly")
DICOMS = ("siim/cxr_pa_jpeg_baseline.dcm", "wg04/RG3_JPLY.dcm", "wg04/RG2_J2KR.dcm")
TOLERANCE = 2e-6  # probabilities: a batch of other studies moves a float's last bits


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from cxrtool.ray_engine import LocalCluster

    with LocalCluster(nodes=2, cpus=1) as made:
        yield made


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint) -> Path:
    return make_checkpoint(FINDINGS, name="tiny", thresholds={"Effusion": 0.0})


@pytest.fixture(scope="module")
def studies(nih_dir, dicom_dir, tmp_path_factory) -> Path:
    """Ten NIH images and three real DICOMs (JPEG baseline, JPEG lossy 12-bit, JPEG 2000)."""
    folder = tmp_path_factory.mktemp("studies") / "studies"
    folder.mkdir()
    for path in sorted((nih_dir / "images").glob("*.png"))[:10]:
        shutil.copyfile(path, folder / path.name)
    for name in DICOMS:
        shutil.copyfile(dicom_dir / name, folder / Path(name).name)
    return folder


def many_copies(studies: Path, folder: Path, copies: int) -> Path:
    """``copies`` copies of the NIH images of ``studies`` in a new ``folder``."""
    folder.mkdir()
    for copy in range(copies):
        for path in sorted(studies.glob("*.png")):
            shutil.copyfile(path, folder / f"{copy}_{path.name}")
    return folder


def predict_command(cluster, folder: Path, checkpoint: Path) -> list[str]:
    return [sys.executable, "-m", "cxrtool", "predict", str(folder), "-m", str(checkpoint), "--runtime", "torch",
            "--engine", "ray", "--ray-address", cluster.address, "-b", "2"]


def kill_the_worker_mid_run(cluster, folder: Path, checkpoint: Path, *, after: int, **environment: str) -> tuple[int, str]:
    """``predict`` of ``folder`` on the cluster in a process of its own (as a user's would be);
    the worker node (1) killed once ``after`` studies are written. The run's exit status and
    output (stdout and stderr)."""
    env = {**cluster.env, "CXRTOOL_NO_PROGRESS": "1", **environment}
    run = subprocess.Popen(predict_command(cluster, folder, checkpoint), env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*.cxrtool.json"))) < after:
        assert run.poll() is None, run.stdout.read() if run.stdout else ""
        assert time.monotonic() < deadline, "no study was written in 5 minutes"
        time.sleep(0.2)
    cluster.kill(1)
    output, _ = run.communicate(timeout=600)
    return run.returncode, output

def copy_of(studies: Path, where: Path) -> Path:
    shutil.copytree(studies, where)
    return where


def sidecars(folder: Path) -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.cxrtool.json"))}


def comparable(value, key: str = ""):
    """A sidecar without when it was made and its copy's inode and ctime, probabilities
    rounded to the tolerance."""
    if isinstance(value, dict):
        return {k: comparable(v, k) for k, v in value.items() if k not in ("created", "file_stat")}
    if isinstance(value, list):
        return [comparable(v, key) for v in value]
    if isinstance(value, float) and key in ("probability", "raw_probability"):
        return round(value / TOLERANCE)
    return value


def table(folder: Path, name: str = "cxrtool_predictions.csv") -> list[dict[str, str]]:
    with open(folder / name, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def assert_same_tables(local: list[dict[str, str]], remote: list[dict[str, str]]) -> None:
    assert [row.get("file") or row.get("image") for row in local] == [row.get("file") or row.get("image") for row in remote]
    for a, b in zip(local, remote, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key in FINDINGS:
                assert float(a[key]) == pytest.approx(float(b[key]), abs=TOLERANCE), key
            elif key not in ("created",):
                assert a[key] == b[key], key


def test_predict_on_two_nodes_writes_what_the_local_engine_writes(cluster, studies, checkpoint, tmp_path):
    from cxrtool.predict import predict

    local, remote = copy_of(studies, tmp_path / "local"), copy_of(studies, tmp_path / "ray")
    here = predict([local], model=checkpoint, runtime="torch", workers=0)
    there = predict([remote], model=checkpoint, runtime="torch", engine="ray", ray_address=cluster.address)
    assert here.predicted == there.predicted == 13 and not there.failed
    assert sidecars(local).keys() == sidecars(remote).keys()
    for name, document in sidecars(local).items():
        assert comparable(document) == comparable(sidecars(remote)[name]), name
    assert_same_tables(table(local), table(remote))
    # Work on both nodes: decoding on one, the model (one actor, one CPU) on the other.
    report = there.engine
    assert report.engine == "ray" and len(report.nodes) == 2, report.to_dict()
    assert sum(report.decoded_on.values()) == sum(report.modelled_on.values()) == 13 and report.actors == 1
    # A local run over the Ray run's folder: all done already (the runs are interchangeable).
    again = predict([remote], model=checkpoint, runtime="torch", workers=0)
    assert again.skipped == 13 and again.predicted == 0


def test_explain_on_two_nodes_writes_what_the_local_engine_writes(cluster, studies, checkpoint, tmp_path):
    import cv2
    import numpy as np

    from cxrtool.explain import ExplainSettings, explain

    local, remote = copy_of(studies, tmp_path / "local"), copy_of(studies, tmp_path / "ray")
    settings = ExplainSettings(findings=("Effusion",))
    here = explain([local], model=checkpoint, settings=settings, workers=0)
    there = explain([remote], model=checkpoint, settings=settings, engine="ray", ray_address=cluster.address)
    assert here.predicted == there.predicted == 13 and len(there.engine.nodes) == 2
    for name, document in sidecars(local).items():
        other = sidecars(remote)[name]
        assert comparable(document) == comparable(other), name
        for kind in ("mask", "map"):  # the files the actors wrote, pixel for pixel
            file = document["results"][0]["explanations"]["findings"]["Effusion"]["files"][kind]
            a, b = (cv2.imread(str(folder / file), cv2.IMREAD_UNCHANGED) for folder in (local, remote))
            assert a is not None and np.array_equal(a, b), (name, kind)
    assert_same_tables(table(local), table(remote))


def test_radiomics_on_two_nodes_gives_the_local_table(cluster, studies, tmp_path):
    from cxrtool.radiomics.run import radiomics

    local, remote = copy_of(studies, tmp_path / "local"), copy_of(studies, tmp_path / "ray")
    pick = lambda folder: sorted(folder.glob("0000*.png"))[:4] + sorted(folder.glob("*.dcm"))  # noqa: E731 (7 images)
    here = radiomics(pick(local), classes=["firstorder"], workers=0)
    there = radiomics(pick(remote), classes=["firstorder"], engine="ray", ray_address=cluster.address)
    assert here.measured == there.measured == 7 and not there.failed
    a, b = table(local, "cxrtool_radiomics.csv"), table(remote, "cxrtool_radiomics.csv")
    strip = lambda rows, root: [{k: v.replace(str(root), "") for k, v in row.items()} for row in rows]  # noqa: E731
    assert strip(a, local) == strip(b, remote)
    assert len(there.engine.decoded_on) == 2  # both nodes measured (a task a CPU)


def test_a_failure_on_the_cluster_stops_the_run_in_one_line(cluster, studies):
    """An actor that cannot open the model (here: a file no node has): the run stops with an
    EngineError saying why in one line (the exception's last line, not Ray's traceback)."""
    from cxrtool.engines import Engine, EngineReport
    from cxrtool.errors import EngineError
    from cxrtool.predict import ScoreChunk
    from cxrtool.preprocess import Preprocessing
    from cxrtool.ray_engine import ModelRecipe, process_studies, ray_session
    from cxrtool.runner import StudyInputs

    files = sorted(studies.glob("*.png"))[:2]
    recipe = ModelRecipe(model="/nowhere/model.safetensors", device="cpu", runtime="torch", tta=None, zero_shot=None,
                         make_processor=ScoreChunk, settings={}, version="test", folder=os.getcwd())
    with pytest.raises(EngineError) as stopped, ray_session(Engine("ray", cluster.address)):
        list(process_studies(StudyInputs(files, {"m": Preprocessing(input_size=64)}), recipe,
                             (files, [studies] * len(files)), batch_size=2, report=EngineReport()))
    assert str(stopped.value) == "the Ray engine stopped: CheckpointError: /nowhere/model.safetensors: no such checkpoint file"


def test_ray_is_not_started_again_behind_a_finished_session(cluster):
    """After a run's Ray session ends, a call into Ray (as from a thread of Ray Data's still
    running when a stopped run shuts Ray down) fails; it does not start a local Ray instance in
    the dying process, whose logs would follow the run's one line (seen once in CI). As in the
    CLI, the engine is asked for before Ray is imported."""
    script = ("from cxrtool.engines import engine\n"
              "from cxrtool.ray_engine import ray_session\n"
              f"with ray_session(engine('ray', {cluster.address!r})):\n"
              "    import ray\n"
              "    assert ray.get(ray.put(1)) == 1\n"
              "try:\n"
              "    ray.put(2)\n"
              "except Exception as error:\n"
              "    print('refused:', type(error).__name__)\n"
              "print('initialised:', ray.is_initialized())\n")
    env = {key: value for key, value in os.environ.items() if key != "RAY_ENABLE_AUTO_CONNECT"}
    done = subprocess.run([sys.executable, "-c", script], env={**env, **cluster.env}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["refused: RaySystemError", "initialised: False"], done.stdout + done.stderr


def test_usage_errors_before_any_work(studies, checkpoint, tmp_path):
    from typer.testing import CliRunner

    from cxrtool.cli import app

    runner = CliRunner()
    refused = runner.invoke(app, ["predict", str(studies), "-m", str(checkpoint), "--engine", "spark"])
    assert refused.exit_code == 2 and "one of local, ray" in refused.output
    refused = runner.invoke(app, ["predict", str(studies), "-m", str(checkpoint), "--ray-address", "auto"])
    assert refused.exit_code == 2 and "--ray-address goes with --engine ray" in refused.output
    saved = sys.modules.get("ray")
    sys.modules["ray"] = None  # type: ignore[assignment]  # as if Ray were not installed
    try:
        refused = runner.invoke(app, ["radiomics", str(studies), "--engine", "ray", "--out", str(tmp_path / "r.csv")])
    finally:
        sys.modules["ray"] = saved  # type: ignore[assignment]
    assert refused.exit_code == 2 and 'needs Ray: pip install "cxrtool[ray]"' in refused.output
    unreachable = runner.invoke(app, ["predict", str(studies), "-m", str(checkpoint), "--engine", "ray",
                                      "--ray-address", f"127.0.0.1:{free_port()}", "--out", str(tmp_path / "o")])
    assert unreachable.exit_code == 2 and "cannot start or join Ray at 127.0.0.1:" in unreachable.output
    assert "Traceback" not in unreachable.output


def test_a_worker_node_killed_mid_run_loses_nothing_and_does_nothing_twice(cluster, studies, checkpoint, tmp_path):
    """The run is a separate process (as a user's would be); the worker node is killed once a
    few studies are written. The run finishes on the head node (Ray runs the lost tasks
    again and starts a new actor), or stops with one clear line; either way a re-run does
    exactly the studies without a result, and none of those written before is written again."""
    folder = many_copies(studies, tmp_path / "many", 4)  # 40 studies, a few seconds each on one CPU
    returncode, output = kill_the_worker_mid_run(cluster, folder, checkpoint, after=4)
    assert "Traceback" not in output, output
    written = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.cxrtool.json")}
    if returncode == 0:
        assert len(written) == 40 and "40 predicted" in output, output
    else:
        assert returncode in (1, 2) and output.strip().splitlines()[-1].startswith(("error", "warning")), output

    from cxrtool.predict import predict

    again = predict([folder], model=checkpoint, runtime="torch", workers=0)
    assert again.skipped == len(written) and again.predicted == 40 - len(written) and not again.failed
    assert {name: (folder / name).stat().st_mtime_ns for name in written} == written  # none written twice


def test_the_watch_stops_a_run_the_cluster_has_no_room_for_and_one_that_gets_nothing_back(monkeypatch):
    """Ray waits without end for resources that never come and for results that never come;
    the run's Watch stops it with one line saying what the cluster has left."""
    import threading

    from cxrtool import ray_engine
    from cxrtool.errors import EngineError, UsageError
    from cxrtool.ray_engine import Watch

    one_cpu = [{"CPU": 1.0}]
    nodes = {"now": [{"CPU": 0.0}, {"CPU": 1.0, "GPU": 1.0}]}
    watch = Watch(gpu=True, no_room=0.2, stall=60, nodes=lambda: nodes["now"])
    watch.check()  # room: a GPU, and two shares of a CPU
    nodes["now"] = [{"CPU": 0.0}]  # the worker lost: a head without CPUs
    watch.check()  # (the clock starts)
    nodes["now"] = [{"CPU": 0.0}, {"CPU": 1.0}]  # a node back, but no GPU for the GPU actors
    time.sleep(0.25)
    with pytest.raises(EngineError) as stopped:
        watch.check()
    assert "no room for the run for 0 s (2 node(s) alive: 1 CPU, 0 GPU; the run needs a GPU and a CPU" in str(stopped.value)

    watch = Watch(no_room=0.2, stall=60, nodes=lambda: nodes["now"])
    nodes["now"] = [{"CPU": 0.5}]  # half a CPU: an actor, no decoding
    watch.check()
    nodes["now"] = one_cpu  # room again: the clock is reset
    time.sleep(0.25)
    watch.check()
    assert watch.no_room_since is None

    def head_lost():
        raise ConnectionError("GCS at 127.0.0.1:6379 unreachable")

    watch = Watch(no_room=0.2, stall=60, nodes=head_lost)  # the head node lost: no room, said so
    watch.check()
    time.sleep(0.25)
    with pytest.raises(EngineError, match=r"\(the cluster does not answer: GCS at 127.0.0.1:6379 unreachable; the run"):
        watch.check()

    monkeypatch.setenv("CXRTOOL_RAY_NO_ROOM_S", "3s")  # the settings: a number, or said at once
    with pytest.raises(UsageError, match="CXRTOOL_RAY_NO_ROOM_S: a number of seconds, not '3s'"):
        Watch(nodes=lambda: one_cpu)
    monkeypatch.setenv("CXRTOOL_RAY_NO_ROOM_S", "7")
    assert Watch(nodes=lambda: one_cpu).no_room == 7.0

    monkeypatch.setattr(ray_engine, "POLL_S", 0.05)
    never = threading.Event()

    def stuck():
        yield "first"
        never.wait()  # Ray waiting for a result that never comes
        yield "never"

    watch = Watch(no_room=60, stall=0.3, nodes=lambda: one_cpu)
    got = []
    with pytest.raises(EngineError) as stopped:
        got.extend(watch.iterate(stuck()))
    never.set()
    assert got == ["first"]
    assert str(stopped.value) == "the Ray engine stopped: nothing came back from the cluster in 0 s (1 node(s) alive: 1 CPU, 0 GPU)"

    def failing():
        yield 1
        raise ValueError("a block lost")

    with pytest.raises(ValueError, match="a block lost"):  # what the iterator raises, raised here
        list(Watch(nodes=lambda: one_cpu).iterate(failing()))


def test_a_cluster_left_with_no_cpu_stops_the_run_and_one_cpu_is_enough_to_finish_it(studies, checkpoint, tmp_path):
    """A head node without CPUs (as most clusters') and one worker of one CPU; the worker is
    killed mid-run. Nothing can run: the run stops with one line saying so (here after 3 s
    without room, CXRTOOL_RAY_NO_ROOM_S), not a wait without end. A worker of one CPU joins:
    the same command finishes the rest on it (a model actor and decoding on one CPU), the
    studies written before not written again."""
    from cxrtool.ray_engine import LocalCluster

    folder = many_copies(studies, tmp_path / "many", 3)
    with LocalCluster(nodes=2, cpus=1, head_cpus=0) as cluster:
        returncode, output = kill_the_worker_mid_run(cluster, folder, checkpoint, after=2, CXRTOOL_RAY_NO_ROOM_S="3")
        written = {path.name: path.stat().st_mtime_ns for path in folder.glob("*.cxrtool.json")}
        assert returncode == 1 and len(written) < 30, output
        last = output.strip().splitlines()[-1]
        assert last.startswith("error: the Ray engine stopped: the cluster has had no room for the run for "), output
        assert "(1 node(s) alive: 0 CPU, 0 GPU; the run needs a CPU on a live node)" in last, output
        assert "Traceback" not in output, output

        cluster.add(cpus=1)
        again = subprocess.run(predict_command(cluster, folder, checkpoint), capture_output=True, text=True, timeout=300,
                               env={**cluster.env, "CXRTOOL_NO_PROGRESS": "1"})
    assert again.returncode == 0, again.stderr
    assert f"{30 - len(written)} predicted, {len(written)} already done, 0 failed of 30 studies" in again.stderr
    assert {name: (folder / name).stat().st_mtime_ns for name in written} == written  # none written twice
