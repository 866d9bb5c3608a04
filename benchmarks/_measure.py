"""Shared benchmark plumbing: run a command in a child process and sample the memory of its
whole process tree (the child plus its decoding workers) from /proc, as PSS so that pages
shared between forked workers are not counted twice."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _tree(pid: int) -> list[int]:
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        queue.extend(_children(current))
    return pids


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], *, env: dict | None = None, interval: float = 0.05, sample_memory: bool = True) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall seconds, peak tree PSS in MiB, output).

    Reading a process's PSS makes the kernel walk its page tables (about 9 ms for a process
    holding torch), so sampling costs a noticeable share of a 2-core machine, more so for a
    run with several worker processes: time with ``sample_memory=False`` (peak is then 0) and
    measure memory in a separate run.
    """
    started = time.perf_counter()
    process = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(_pss_kib(p) for p in _tree(process.pid)))
            time.sleep(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_memory:
        sampler.start()
    output, _ = process.communicate()
    done.set()
    if sample_memory:
        sampler.join()
    return process.returncode, time.perf_counter() - started, peak / 1024, output
