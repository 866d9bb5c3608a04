"""Worker processes, one way: predict, explain, radiomics and train all start theirs here.

``-j N`` (``workers``) means the same everywhere: N worker processes, and 0 for none (all
the work in the calling process). Every worker starts through :func:`limit_threads`, so
each process's compute libraries (torch, OpenCV, the BLAS and OpenMP pools, SimpleITK)
use its share of the cores and never a thread per core in every worker. Two kinds of pool:

- a torch DataLoader's workers (the runner's decoding, train's batches), started with
  :func:`worker_init` (one thread each: they decode and augment, a core each);
- :func:`process_pool` for jobs mapped over a list (radiomics' regions, the training
  cache's images, paper 4's feedback cycles), each worker with cores // N threads; with
  N = 0 the same ``map`` runs in the calling process.

Forking is done safely: inside :func:`fork_safe_opencv`, and with the child's torch
single-threaded (a child forked from a process whose OpenMP pool was running hangs in its
first parallel region; one thread never enters one).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any


def cores() -> int:
    """The cores this process may use (its CPU affinity where the system says it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def limit_threads(threads: int) -> None:
    """Run this process's compute libraries on ``threads`` threads each (those it has loaded:
    a worker forked from a process that imported them has them too)."""
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    if "cv2" in sys.modules:
        import cv2

        cv2.setNumThreads(threads)
    if "SimpleITK" in sys.modules or "radiomics" in sys.modules:
        import SimpleITK as sitk

        # its filters (LoG, wavelet, resampling) would otherwise each start a thread per core
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if "numpy" in sys.modules:
        with contextlib.suppress(ImportError):
            from threadpoolctl import threadpool_limits

            threadpool_limits(threads)


def worker_init(_: int = 0) -> None:
    """A DataLoader worker's set-up (its ``worker_init_fn``): one thread for everything."""
    limit_threads(1)


@contextlib.contextmanager
def fork_safe_opencv() -> Iterator[None]:
    """Fork workers (create the DataLoader's iterator, or a process pool) inside this block.

    A child forked while OpenCV's thread pool is running inherits the pool's bookkeeping
    but not its threads, and hangs in the pool's next call (``setNumThreads`` included):
    a long-lived process that resized a large image before calling ``predict`` would
    freeze. OpenCV runs single-threaded in the parent for the moment of the fork, so the
    children start single-threaded and consistent; the parent's setting is restored.
    """
    import cv2

    previous = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


class InProcess(Executor):
    """``process_pool(0)``: the pool's ``map``, in the calling process, lazily and in order."""

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout=None, chunksize: int = 1,
            **_: Any) -> Iterator[Any]:
        return map(fn, *iterables)


@contextlib.contextmanager
def process_pool(workers: int) -> Iterator[Executor]:
    """``workers`` processes for a ``map`` over jobs (0: :class:`InProcess`), each on
    cores // workers threads, started safely; shut down (waiting for them) on the way out.

    Example:
        >>> with process_pool(4) as pool:
        ...     rows = list(pool.map(measure, jobs, chunksize=1))
    """
    if workers <= 0:
        yield InProcess()
        return
    threads = max(1, cores() // workers)
    with fork_safe_opencv(), ProcessPoolExecutor(max_workers=workers, initializer=limit_threads,
                                                 initargs=(threads,)) as pool:
        yield pool


def default_workers() -> int:
    """``-j``'s default: a worker per core, at most 8 (beyond that the decoders' memory grows
    faster than the throughput)."""
    return min(cores(), 8)


__all__ = ["InProcess", "cores", "default_workers", "fork_safe_opencv", "limit_threads", "process_pool", "worker_init"]
