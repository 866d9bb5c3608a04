"""Where a run's work is done: the engines (``--engine local|ray``).

``local`` (the default) is this machine: decoding in worker processes, the model here or in
them (:mod:`cxrtool.runner`), radiomics in a process pool (:mod:`cxrtool.radiomics.batch`).
``ray`` is a Ray cluster (:mod:`cxrtool.ray_engine`): the studies are read and decoded in
Ray tasks, the model runs in an actor pool (loaded once per actor), and the results come
back here in order, to the same output stages as a local run's: the same files, the same
"already done", locking and atomic-write rules, so a Ray run and a local run of the same
folder (on a filesystem every node sees) are interchangeable, and a run that dies part-way
resumes under either.

This module only names the engines and checks a request; it imports no Ray.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

ENGINES = ("local", "ray")
RAY_INSTALL = 'pip install "cxrtool[ray]"'


@dataclass(frozen=True)
class Engine:
    """An engine as a run asks for it: ``name`` (one of :data:`ENGINES`) and, for Ray, the
    cluster's ``address`` (None: start a Ray instance on this machine for the run; "auto":
    the cluster this machine's environment names, as ``ray start`` left it)."""

    name: str = "local"
    address: str | None = None

    @property
    def is_local(self) -> bool:
        return self.name == "local"


LOCAL = Engine()


def import_ray() -> Any:
    """Ray, imported with its implicit ``ray.init`` off (``RAY_ENABLE_AUTO_CONNECT=0``, read
    when Ray is first imported; a value the user set is kept). Otherwise a call into Ray from
    a thread of Ray Data's still running when a stopped run shuts Ray down starts a new local
    Ray instance in the dying process, and its logs follow the run's one line.

    Raises:
        ImportError: Ray is not installed.
    """
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    import ray

    return ray


def engine(name: str | Engine | None = None, address: str | None = None) -> Engine:
    """The engine a run asks for, checked before any work.

    Raises:
        UsageError: an unknown engine, an address without Ray, or Ray not installed (with
            the line that installs it).
    """
    from cxrtool.errors import UsageError

    if isinstance(name, Engine):
        return name
    name = (name or "local").strip().lower()
    if name not in ENGINES:
        raise UsageError(f"--engine {name!r}: one of {', '.join(ENGINES)}")
    if name == "local":
        if address is not None:
            raise UsageError("--ray-address goes with --engine ray")
        return LOCAL
    try:
        import_ray()
    except ImportError:
        raise UsageError(f"--engine ray needs Ray: {RAY_INSTALL}") from None
    return Engine("ray", address.strip() if address else None)


@dataclass
class EngineReport:
    """Where a run's work was done: per node, how many studies (or regions) were read and
    decoded there and how many went through the model there (Ray's node ids; "local" for a
    local run), and how many model actors the pool started."""

    engine: str = "local"
    address: str | None = None
    decoded_on: dict[str, int] = field(default_factory=dict)
    modelled_on: dict[str, int] = field(default_factory=dict)
    actors: int = 0

    def count(self, kind: str, node: str) -> None:
        counts = self.decoded_on if kind == "decoded" else self.modelled_on
        counts[node] = counts.get(node, 0) + 1

    @property
    def nodes(self) -> list[str]:
        return sorted(set(self.decoded_on) | set(self.modelled_on))

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "address": self.address, "decoded_on": dict(self.decoded_on),
                "modelled_on": dict(self.modelled_on), "actors": self.actors}

    def line(self) -> str:
        """One line for the end of a run: what ran where."""
        if self.engine == "local":
            return "engine: local"
        decoded = sum(self.decoded_on.values())
        modelled = sum(self.modelled_on.values())
        return (f"engine: ray ({self.address or 'a local instance'}), {len(self.nodes)} node(s) in all: {decoded} "
                f"read and decoded on {len(self.decoded_on)}, {modelled} through the model on {len(self.modelled_on)}"
                + (f" in {self.actors} actor(s)" if self.actors else ""))


__all__ = ["ENGINES", "LOCAL", "RAY_INSTALL", "Engine", "EngineReport", "engine"]
