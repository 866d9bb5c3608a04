"""The Ray engine (``--engine ray``): a run's studies through a Ray cluster.

For ``predict`` and ``explain`` (:func:`process_studies`), a Ray Data pipeline:

1. the studies to do, by index into the run's list (blocks made here);
2. read and decoded in Ray **tasks** (a few studies a task): the same
   :class:`cxrtool.runner.StudyInputs` as a local run's workers (fetching a DICOMweb study
   into its cache first), so each study is decoded once, by the same code;
3. the model in an **actor pool** (``map_batches`` with an ``ActorPoolStrategy``): each
   actor opens the model once (:func:`cxrtool.models.sources.open_model`, one GPU an actor
   where the cluster has GPUs: as many actors as GPUs; else as many actors as half the
   cluster's CPUs, the other half decoding: see :func:`_pool` for what each takes from
   Ray's books) and runs the run's own chunk processor on its batches (``predict``'s
   scoring, ``explain``'s maps, whose files it writes);
4. back here, in the order of the list (``preserve_order``), each study to the run's output
   stages, as a local run's: the sidecars, the tables, SR/SEG, sending to a PACS.

So the files, the "already done" rule, the locks and the atomic writes are a local run's:
on a filesystem every node sees (the studies, the outputs, the model), a Ray run and a local
run of the same folder are interchangeable, and a run that dies part-way resumes under
either (what was handed to the stages is written; the rest is done by the next run). A
worker node lost mid-run: Ray runs its tasks again elsewhere, and restarts its actors; a
cluster left with no room for the run, or a run that gets nothing back, stops with one line
(:class:`Watch`) where Ray would wait without end.

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
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.engines import Engine, EngineReport
from cxrtool.errors import env_seconds

DECODE_CHUNK = 16  # studies a decoding task takes (fewer, larger tasks: less of Ray's cost a task)
DECODE_CALLS = 200  # decoding tasks a worker process runs before Ray replaces it
SHARE = 0.5  # of a CPU, in Ray's books, a model actor or a decoding task takes (see _pool)
NO_ROOM_S = 120.0  # how long a cluster may have no room for the run (a node restarting, an autoscaler) ...
STALL_S = 1800.0  # ... and how long a run may get nothing back, before it stops (see Watch)
POLL_S = 5.0  # how often a waiting run looks at the cluster


@contextlib.contextmanager
def ray_session(target: Engine) -> Iterator[None]:
    """Ray for the run: the cluster at ``target.address`` ("auto": the one this machine's
    environment names), or, without an address, a Ray instance started here for the run (on
    this machine's cores) and stopped after it. A session already open (a script's own
    ``ray.init``) is used as it is.

    Raises:
        UsageError: the cluster cannot be joined (one line: the address, what Ray said).
    """
    from cxrtool._workers import cores
    from cxrtool.engines import import_ray
    from cxrtool.errors import UsageError
    from cxrtool.io.study import one_line

    ray = import_ray()
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


def _pool(gpu_wanted: bool) -> tuple[int, dict[str, Any], int]:
    """How many model actors, what each takes, and how many decoding tasks at once.

    Where the cluster has GPUs (and the run may use them): an actor a GPU. Else half the
    cluster's CPUs run actors, the other half decoding tasks: a healthy cluster's cores each
    run one thread. Both take half a CPU (:data:`SHARE`) from Ray's books, so that any one node
    that is left, however small, holds an actor and a decoding task together: with a whole CPU
    each, a cluster shrunk to one CPU by a lost node (or started with one) gives it to the
    restarted actor, and no study is decoded again, ever (Ray waits for resources without end).
    """
    import ray

    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0))
    if gpus and gpu_wanted:
        return gpus, {"num_gpus": 1, "num_cpus": SHARE}, cpus
    actors = max(1, cpus // 2)
    return actors, {"num_cpus": SHARE}, max(1, cpus - actors)


def process_studies(inputs: Any, recipe: ModelRecipe, places: tuple[list[Path], list[Path]], *, batch_size: int,
                    report: EngineReport) -> Iterator[Any]:
    """The run's studies (``inputs``: a :class:`cxrtool.runner.StudyInputs` over the studies
    to do; ``places`` their files and output folders) through the cluster: each processed
    study (a ``DecodedStudy`` with its result or its error), in the order of the list, as it
    comes back."""
    import ray

    if len(inputs) == 0:
        return
    actors, resources, decoders = _pool(recipe.device != "cpu")
    chunk = max(1, min(DECODE_CHUNK, batch_size))
    # The list's indices as blocks made here (``ray.data.range`` would read them in tasks of a
    # whole CPU each, which a one-CPU node holding an actor has not got).
    dataset = ray.data.from_items([{"id": index} for index in range(len(inputs))],
                                  override_num_blocks=max(1, min(len(inputs) // chunk, 10_000)))
    # Decoding runs in tasks of their own, in worker processes replaced every DECODE_CALLS
    # tasks (decoders' freed memory stays with a process: this keeps it flat); that setting,
    # which actors do not take, also keeps Ray Data from fusing the tasks into the actors.
    dataset = dataset.map_batches(_decode, fn_args=([ray.put((inputs, places))], recipe.folder), batch_size=chunk,
                                  num_cpus=SHARE, compute=ray.data.TaskPoolStrategy(size=decoders),
                                  batch_format="numpy", max_calls=DECODE_CALLS)
    dataset = dataset.map_batches(ModelActor, fn_constructor_args=(recipe,), batch_size=batch_size,
                                  compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                                  batch_format="numpy", **resources)
    seen_actors: set[str] = set()
    watch = Watch(gpu=bool(resources.get("num_gpus")))
    with _engine_errors():
        for batch in watch.iterate(dataset.iter_batches(batch_size=None, batch_format="numpy")):
            for raw, decoded_on, modelled_on, actor in zip(batch["item"], batch["decoded_on"], batch["modelled_on"],
                                                           batch["actor"], strict=True):
                report.count("decoded", str(decoded_on))
                report.count("modelled", str(modelled_on))
                seen_actors.add(str(actor))
                report.actors = len(seen_actors)
                yield pickle.loads(raw)


class Watch:
    """Whether a run on the cluster still goes, for a driver that would otherwise wait on Ray
    without end: Ray waits for resources that never come (the nodes a run needs lost, a head
    node without CPUs left alone) and for results that never come, silently.

    The run stops (an EngineError, one line with the cluster's state; what was written stays,
    and a re-run does the rest) when the cluster has had no room for it (fewer than two
    :data:`SHARE` s left on the live nodes together, room for an actor and a decoding task;
    or no GPU left for a run whose actors take GPUs) for ``no_room`` seconds,
    or nothing has come back for ``stall`` seconds however the cluster looks. Both from the
    environment where set: ``CXRTOOL_RAY_NO_ROOM_S``, ``CXRTOOL_RAY_STALL_S`` (a value that is
    not a number: a UsageError, before any study goes to the cluster).
    """

    def __init__(self, *, gpu: bool = False, no_room: float | None = None, stall: float | None = None,
                 nodes: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.gpu = gpu
        self.no_room = no_room if no_room is not None else env_seconds("CXRTOOL_RAY_NO_ROOM_S", NO_ROOM_S)
        self.stall = stall if stall is not None else env_seconds("CXRTOOL_RAY_STALL_S", STALL_S)
        self._nodes = nodes or _alive_nodes
        self.last = time.monotonic()
        self.no_room_since: float | None = None

    def progressed(self) -> None:
        self.last = time.monotonic()

    def check(self) -> None:
        """Raises:
        EngineError: no room for ``no_room`` seconds, or nothing back for ``stall``."""
        from cxrtool.errors import EngineError

        now = time.monotonic()
        room, state = self.room()
        if room:
            self.no_room_since = None
        elif self.no_room_since is None:
            self.no_room_since = now
        elif now - self.no_room_since >= self.no_room:
            needs = "a GPU and a CPU" if self.gpu else "a CPU"
            raise EngineError(f"the Ray engine stopped: the cluster has had no room for the run for "
                              f"{now - self.no_room_since:.0f} s ({state}; the run needs {needs} on a live node)")
        if now - self.last >= self.stall:
            raise EngineError(f"the Ray engine stopped: nothing came back from the cluster in {now - self.last:.0f} s "
                              f"({state})")

    def room(self) -> tuple[bool, str]:
        """Whether the live nodes can hold the run (a model actor and a decoding task), and
        what they are, in words."""
        try:
            alive = self._nodes()
        except Exception as error:  # noqa: BLE001 - the head node lost: Ray's and gRPC's errors alike
            from cxrtool.io.study import one_line

            return False, f"the cluster does not answer: {one_line(str(error) or type(error).__name__, 120)}"
        shares = sum(int(node.get("CPU", 0) / SHARE + 1e-9) for node in alive)
        cpus = sum(node.get("CPU", 0) for node in alive)
        gpus = sum(node.get("GPU", 0) for node in alive)
        room = shares >= 2 and (gpus >= 1 or not self.gpu)
        return room, f"{len(alive)} node(s) alive: {cpus:g} CPU, {gpus:g} GPU"

    def iterate(self, items: Iterator[Any]) -> Iterator[Any]:
        """``items`` (an iterator that blocks inside Ray), read in a thread of its own, so that
        this thread can :meth:`check` while it waits."""
        handed: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)
        stop = threading.Event()

        def hand(kind: str, value: Any) -> bool:
            while not stop.is_set():
                try:
                    handed.put((kind, value), timeout=1.0)
                    return True
                except queue.Full:
                    continue
            return False

        def pump() -> None:
            try:
                for item in items:
                    if not hand("item", item):
                        return
                hand("end", None)
            except Exception as error:  # noqa: BLE001 - handed to the run's thread, which raises it
                hand("error", error)

        threading.Thread(target=pump, name="cxrtool-ray-results", daemon=True).start()
        finished = False
        try:
            while True:
                try:
                    kind, value = handed.get(timeout=POLL_S)
                except queue.Empty:
                    self.check()
                    continue
                if kind == "end":
                    finished = True
                    return
                if kind == "error":
                    raise value
                self.progressed()
                yield value
        finally:
            stop.set()
            if not finished:
                _hush_ray_data()


def _hush_ray_data() -> None:
    """Ray Data's loggers off, for a run stopped under a pipeline still waiting in its
    thread: when Ray shuts down under it, it logs its own shutdown as a traceback, which would
    bury the run's one line."""
    for name in list(logging.root.manager.loggerDict):
        if name == "ray.data" or name.startswith("ray.data."):
            logging.getLogger(name).disabled = True


def _alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


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
    todo = list(groups)
    todo.reverse()
    watch = Watch()
    while todo or pending:
        while todo and len(pending) < window:
            group = todo.pop()
            pending.append(measure.remote(list(group), params, classes, digest, os.getcwd()))
        with _engine_errors():
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            if not done:
                watch.check()
                continue
            watch.progressed()
            rows, node = ray.get(done[0])
        for _ in rows:
            report.count("decoded", node)
        yield rows


class LocalCluster:
    """A throw-away Ray cluster of ``nodes`` nodes on this machine (``ray start``: a head,
    then workers joining it; ``cpus`` each, the head ``head_cpus`` where given: 0 as many
    clusters' heads, which run no work), for trying the engine the way a cluster runs it
    (the tests and ``benchmarks/ray_engine.py`` use it). On 127.0.0.1, without token
    authentication (nothing off this machine can reach it); ``address`` is what
    ``--ray-address`` takes, ``env`` the environment a process joining it needs. Each node is
    a process group of its own: :meth:`kill` ends one at once, as a machine that dies.
    :meth:`stop` (or leaving the ``with`` block) stops them all.
    """

    def __init__(self, nodes: int = 2, cpus: int = 1, *, head_cpus: int | None = None) -> None:
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
                        cpus=cpus if head_cpus is None else head_cpus)
            self.wait_for(1)
            for _ in range(nodes - 1):
                self._start("--address", self.address, cpus=cpus)
            self.wait_for(nodes)
        except BaseException:
            self.stop()
            raise

    def add(self, cpus: int = 1) -> int:
        """A worker node more (``cpus`` CPUs), once it has joined; its number (for :meth:`kill`)."""
        before = self.alive()
        self._start("--address", self.address, cpus=cpus)
        self.wait_for(before + 1)
        return len(self.processes) - 1

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
