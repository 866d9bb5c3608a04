"""Worker processes done safely: shared by predict, explain, radiomics and train's loaders."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def worker_init(_: int = 0) -> None:
    """A forked worker's set-up: torch single-threaded.

    A child forked from a process whose OpenMP thread pool was running (any process that
    ran a torch operation on several threads: the model loaded, or a notebook that used
    torch before) hangs in its first parallel region. One thread never enters one.
    """
    import torch

    torch.set_num_threads(1)


@contextlib.contextmanager
def fork_safe_opencv() -> Iterator[None]:
    """Fork workers (create the DataLoader's iterator) inside this block.

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
