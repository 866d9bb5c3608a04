"""The Ray engine (``--engine ray``): a run's studies through a Ray cluster.

For ``predict`` and ``explain`` (:func:`process_studies`), a Ray Data pipeline:

1. the studies to do, by index into the run's list (``ray.data.range``);
2. read and decoded in Ray **tasks** (one CPU each, a few studies a task): the same
   :class:`cxrtool.runner.StudyInputs` as a local run's workers (fetching a DICOMweb study
   into its cache first), so each study is decoded once, by the same code;
3. the model in an **actor pool** (``map_batches`` with an ``ActorPoolStrategy``): each
   actor opens the model once (:func:`cxrtool.models.sources.open_model`, one GPU an actor
   where the cluster has GPUs: as many actors as GPUs; else one CPU an actor, on half the
   cluster's CPUs, the other half decoding) and runs the run's own chunk processor on its
   batches (``predict``'s scoring, ``explain``'s maps, whose files it writes);
4. back here, in the order of the list (``preserve_order``), each study to the run's output
   stages, as a local run's: the sidecars, the tables, SR/SEG, sending to a PACS.

So the files, the "already done" rule, the locks and the atomic writes are a local run's:
on a filesystem every node sees (the studies, the outputs, the model), a Ray run and a local
run of the same folder are interchangeable, and a run that dies part-way resumes under
either (what was handed to the stages is written; the rest is done by the next run). A
worker node lost mid-run: Ray runs its tasks again elsewhere, and restarts its actors.

For ``radiomics`` (:func:`measure_regions`): each group of regions of one image a Ray task
(one CPU), rows coming back as they finish, to the same journal.

Where work ran is recorded (:class:`cxrtool.engines.EngineReport`: studies per node).
Everything crossing processes is pickled by Ray itself; cxrtool unpickles only what its own
tasks made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.engines import Engine, EngineReport

DECODE_CHUNK = 16  # studies a decoding task takes (fewer, larger tasks: less of Ray's cost a task)
DECODE_CALLS = 200  # decoding tasks a worker process runs before Ray replaces it


@contextlib.contextmanager
def ray_session(target: Engine) -> Iterator[None]:
    """Ray for the run: the cluster at ``target.address`` ("auto": the one this machine's
    environment names), or, without an address, a Ray instance started here for the run (on
    this machine's cores) and stopped after it. A session already open (a script's own
    ``ray.init``) is used as it is.

    Raises:
        UsageError: the cluster cannot be joined (one line: the address, what Ray said).
    """
    import ray

    from cxrtool._workers import cores
    from cxrtool.errors import UsageError
    from cxrtool.io.study import one_line

    _quiet()
    started = False
    if not ray.is_initialized():
        quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if target.address is None:
                ray.init(num_cpus=cores(), **quiet)
            else:
                _answers(target.address)
                ray.init(address=target.address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = target.address or "a local instance"
            raise UsageError(f"--engine ray: cannot start or join Ray at {where}: {one_line(str(error), 200)}") from None
        started = True
    _quiet()  # (Ray Data sets its loggers up when it is first used)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the stages take studies in the run's order
    context.enable_progress_bars = False  # the run's own progress says how far it is
    with contextlib.suppress(AttributeError):
        context.print_on_execution_start = False
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _answers(address: str) -> None:
    """Refuse at once an address (HOST:PORT) where nothing listens (Ray itself waits a
    minute or more for it); "auto" and ``ray://`` addresses are left to Ray.

    Raises:
        ConnectionError: nothing answers there.
    """
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            return
    except ValueError:
        return  # not HOST:PORT: Ray says what is wrong with it
    except OSError as error:
        raise ConnectionError(f"nothing answers there ({error.strerror or error})") from None


def _quiet() -> None:
    """Ray's own notices (execution plans, progress-bar and token notices) off the run's
    stderr, which has the run's progress and one line per problem; its errors stay."""
    for name in ("ray", "ray.data", "ray._private", "ray.util", "ray.data._internal.execution.streaming_executor",
                 "ray.data._internal.progress"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _enter(folder: str) -> None:
    """Work in the run's folder (the driver's working folder), as the run's relative paths
    (studies, outputs, the model, the DICOMweb cache) are relative to it: every node must
    see it at the same path (a shared filesystem).

    Raises:
        RuntimeError: the folder is not there on this node (said with the node's id).
    """
    if os.getcwd() != folder:
        try:
            os.chdir(folder)
        except OSError as error:
            raise RuntimeError(f"node {_node()[:12]}: the run's folder {folder} is not there ({error.strerror}): "
                               "the Ray engine needs the studies and outputs on a filesystem every node sees "
                               "at the same path") from None


def _node() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# Objects a task or actor reads from the object store once per process (the run's inputs).
_FETCHED: dict[str, Any] = {}


def _fetch(holder: list[Any]) -> Any:
    """The object behind ``holder[0]`` (an ObjectRef in a list, so Ray hands it over as a
    reference and each process fetches it once)."""
    import ray

    ref = holder[0]
    key = ref.hex()
    if key not in _FETCHED:
        _FETCHED.clear()  # one run's inputs at a time
        _FETCHED[key] = ray.get(ref)
    return _FETCHED[key]


def _decode(batch: dict[str, np.ndarray], holder: list[Any], folder: str) -> dict[str, np.ndarray]:
    """A decoding task: the studies ``batch["id"]`` of the run's list, read and preprocessed,
    with each one's file and output folder (for the actor's context)."""
    from cxrtool._workers import limit_threads

    limit_threads(1)
    _enter(folder)
    inputs, (paths, folders) = _fetch(holder)
    node = _node()
    ids = [int(index) for index in batch["id"]]
    items = [inputs[index] for index in ids]
    return {"id": batch["id"], "item": np.array([pickle.dumps(item) for item in items], dtype=object),
            "decoded_on": np.array([node] * len(items), dtype=object),
            "path": np.array([str(paths[index]) for index in ids], dtype=object),
            "folder": np.array([str(folders[index]) for index in ids], dtype=object)}


@dataclass
class ModelRecipe:
    """What an actor needs to open the run's model and make its chunk processor, as the
    run's own :class:`cxrtool.runner.RunContext` (``make_processor(context)``)."""

    model: Any
    device: str
    runtime: str
    tta: Any
    zero_shot: Any
    make_processor: Callable[[Any], Callable[[list[Any]], list[Any]]]
    settings: dict[str, Any]
    version: str
    folder: str  # the run's working folder: its relative paths are relative to it


class _Places(dict):
    """An actor's view of the run's list (index -> path, or folder): the studies it has been
    handed, as :class:`cxrtool.runner.RunContext` indexes ``paths`` and ``folders``."""


class ModelActor:
    """An actor of the pool: the model, opened once, and the run's chunk processor."""

    def __init__(self, recipe: ModelRecipe) -> None:
        import ray

        from cxrtool._workers import limit_threads
        from cxrtool.models.network import pick_device
        from cxrtool.models.sources import open_model
        from cxrtool.runner import RunContext

        self.folder = recipe.folder
        _enter(self.folder)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        limit_threads(max(1, int(cpus)))
        device = pick_device(recipe.device)
        scorer = open_model(recipe.model, device=device, runtime=recipe.runtime, tta=recipe.tta,
                            zero_shot=recipe.zero_shot)
        self.paths, self.folders = _Places(), _Places()
        context = RunContext(scorer, device, self.paths, self.folders, recipe.version,  # type: ignore[arg-type]
                             recipe.settings, in_worker=True)
        self.processor = recipe.make_processor(context)
        self.node = _node()
        self.actor = ray.get_runtime_context().get_actor_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _enter(self.folder)
        self.paths.clear()
        self.folders.clear()
        for index, path, folder in zip(batch["id"], batch["path"], batch["folder"], strict=True):
            self.paths[int(index)], self.folders[int(index)] = Path(path), Path(folder)
        items = self.processor([pickle.loads(raw) for raw in batch["item"]])
        return {"id": batch["id"], "item": np.array([pickle.dumps(item) for item in items], dtype=object),
                "decoded_on": batch["decoded_on"], "modelled_on": np.array([self.node] * len(items), dtype=object),
                "actor": np.array([self.actor] * len(items), dtype=object)}


def _pool(gpu_wanted: bool) -> tuple[int, dict[str, Any]]:
    """How many model actors, and what each takes: a GPU each where the cluster has GPUs
    (and the run may use them), else a CPU each on half the cluster's CPUs."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and gpu_wanted:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    return max(1, int(resources.get("CPU", 1)) // 2), {"num_cpus": 1}


def process_studies(inputs: Any, recipe: ModelRecipe, places: tuple[list[Path], list[Path]], *, batch_size: int,
                    report: EngineReport) -> Iterator[Any]:
    """The run's studies (``inputs``: a :class:`cxrtool.runner.StudyInputs` over the studies
    to do; ``places`` their files and output folders) through the cluster: each processed
    study (a ``DecodedStudy`` with its result or its error), in the order of the list, as it
    comes back."""
    import ray

    if len(inputs) == 0:
        return
    actors, resources = _pool(recipe.device != "cpu")
    chunk = max(1, min(DECODE_CHUNK, batch_size))
    dataset = ray.data.range(len(inputs), override_num_blocks=max(1, min(len(inputs) // chunk, 10_000)))
    # Decoding runs in tasks of their own, in worker processes replaced every DECODE_CALLS
    # tasks (decoders' freed memory stays with a process: this keeps it flat); that setting,
    # which actors do not take, also keeps Ray Data from fusing the tasks into the actors.
    dataset = dataset.map_batches(_decode, fn_args=([ray.put((inputs, places))], recipe.folder), batch_size=chunk,
                                  num_cpus=1, batch_format="numpy", max_calls=DECODE_CALLS)
    dataset = dataset.map_batches(ModelActor, fn_constructor_args=(recipe,), batch_size=batch_size,
                                  compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                                  batch_format="numpy", **resources)
    seen_actors: set[str] = set()
    with _engine_errors():
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for raw, decoded_on, modelled_on, actor in zip(batch["item"], batch["decoded_on"], batch["modelled_on"],
                                                           batch["actor"], strict=True):
                report.count("decoded", str(decoded_on))
                report.count("modelled", str(modelled_on))
                seen_actors.add(str(actor))
                report.actors = len(seen_actors)
                yield pickle.loads(raw)


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """A failure of the cluster (or of cxrtool's code on it) as an EngineError: one line,
    the innermost cause's, not Ray's traceback."""
    import ray

    from cxrtool.errors import EngineError
    from cxrtool.io.study import one_line

    try:
        yield
    except (ray.exceptions.RayError, ray.exceptions.RaySystemError) as error:
        # Ray's errors carry the remote traceback; its last line says what went wrong. The
        # deepest cause that says anything.
        said, cause = type(error).__name__, error
        while cause is not None:
            lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
            if lines:
                said = re.sub(r"^(?:\w+\.)+(\w+:)", r"\1", lines[-1])  # (the exception's class without its module)
            cause = getattr(cause, "cause", None) or cause.__cause__
        text = one_line(said, 300)
        raise EngineError(f"the Ray engine stopped: {text}") from None


def _measure(group: Sequence[Any], params: Any, classes: Any, digest: str, folder: str) -> tuple[list[dict[str, Any]], str]:
    from cxrtool._workers import limit_threads
    from cxrtool.radiomics.batch import measure_image

    limit_threads(1)
    _enter(folder)
    return measure_image(group, params, classes, digest), _node()


def measure_regions(groups: Sequence[Sequence[Any]], params: Any, classes: Any, digest: str, *,
                    report: EngineReport) -> Iterator[list[dict[str, Any]]]:
    """radiomics' groups of regions (each of one image) measured in Ray tasks (a CPU each):
    each group's rows as it finishes (not in order), a few tasks per CPU in flight."""
    import ray

    measure = ray.remote(num_cpus=1, max_retries=3)(_measure)
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    queue = list(groups)
    queue.reverse()
    while queue or pending:
        while queue and len(pending) < window:
            group = queue.pop()
            pending.append(measure.remote(list(group), params, classes, digest, os.getcwd()))
        done, pending = ray.wait(pending, num_returns=1)
        with _engine_errors():
            rows, node = ray.get(done[0])
        for _ in rows:
            report.count("decoded", node)
        yield rows


class LocalCluster:
    """A throw-away Ray cluster of ``nodes`` nodes on this machine (``ray start``: a head,
    then workers joining it; ``cpus`` each), for trying the engine the way a cluster runs it
    (the tests and ``benchmarks/ray_engine.py`` use it). On 127.0.0.1, without token
    authentication (nothing off this machine can reach it); ``address`` is what
    ``--ray-address`` takes, ``env`` the environment a process joining it needs. Each node is
    a process group of its own: :meth:`kill` ends one at once, as a machine that dies.
    :meth:`stop` (or leaving the ``with`` block) stops them all.
    """

    def __init__(self, nodes: int = 2, cpus: int = 1) -> None:
        import secrets
        import subprocess
        import sys
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="cxray", dir="/tmp"))  # (Ray's socket paths must stay short)
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self._subprocess, self._python = subprocess, sys.executable
        self.processes: list[Any] = []
        self._name = secrets.token_hex(4)
        try:
            self._start("--head", "--port", str(self.port), "--include-dashboard", "false", "--temp-dir", str(self.folder),
                        cpus=cpus)
            self.wait_for(1)
            for _ in range(nodes - 1):
                self._start("--address", self.address, cpus=cpus)
            self.wait_for(nodes)
        except BaseException:
            self.stop()
            raise

    def _start(self, *args: str, cpus: int) -> None:
        log = open(self.folder / f"node{len(self.processes)}.log", "wb")
        self.processes.append(self._subprocess.Popen(
            [self._python, "-m", "ray.scripts.scripts", "start", "--num-cpus", str(cpus), "--block", *args],
            env=self.env, stdout=log, stderr=self._subprocess.STDOUT, start_new_session=True))

    def alive(self) -> int:
        """How many nodes the cluster counts alive (asked from a process of its own)."""
        script = (f"import ray; ray.init(address={self.address!r}, log_to_driver=False, logging_level='ERROR'); "
                  "print(sum(node['Alive'] for node in ray.nodes()))")
        answer = self._subprocess.run([self._python, "-c", script], env=self.env, capture_output=True, text=True,
                                      timeout=120)
        lines = answer.stdout.strip().splitlines()
        return int(lines[-1]) if answer.returncode == 0 and lines and lines[-1].isdigit() else 0

    def wait_for(self, count: int, timeout: float = 120.0) -> None:
        """Until ``count`` nodes are alive.

        Raises:
            RuntimeError: not within ``timeout`` seconds (the nodes' logs' ends said).
        """
        import time

        deadline = time.monotonic() + timeout
        while self.alive() < count:
            if time.monotonic() > deadline:
                logs = " | ".join(path.read_text(errors="replace")[-600:] for path in sorted(self.folder.glob("node*.log")))
                raise RuntimeError(f"the Ray cluster did not reach {count} nodes: {logs}")
            time.sleep(1)

    def kill(self, node: int) -> None:
        """Node ``node`` (0: the head) dies at once: its raylet and workers killed, no goodbye."""
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.processes[node].pid, signal.SIGKILL)
        self.processes[node].wait(timeout=30)

    def stop(self) -> None:
        import shutil
        import signal

        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)  # the node's processes, all of them
                try:
                    process.wait(timeout=10)
                except self._subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=20)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


__all__ = ["LocalCluster", "ModelActor", "ModelRecipe", "measure_regions", "process_studies", "ray_session"]
