"""Running a network for inference on a CPU: eager PyTorch, or ONNX Runtime.

On a CPU core ONNX Runtime runs the same graph about twice as fast as eager PyTorch
(DenseNet-121 at 224 px on one AVX-512 core: 31-37 ms an image against 71), with logits
equal to about 1e-6. ``predict`` uses it on a CPU when it is installed (``runtime="auto"``;
``pip install "cxrtool[onnx]"``): the network is exported once per checkpoint (torch's own
exporter) into a cache folder and each process opens its own session. ``explain`` always
runs PyTorch: CAMs need the gradients.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from cxrtool.errors import UsageError
from cxrtool.registry import RUNTIMES

ONNX_HINT = 'ONNX Runtime is not installed: pip install "cxrtool[onnx]" (onnxruntime, onnx, onnxscript)'


def onnx_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "onnxscript"))


def cache_folder() -> Path:
    """Where exported graphs are kept: ``$CXRTOOL_CACHE``, else ``$XDG_CACHE_HOME/cxrtool``,
    else ``~/.cache/cxrtool``."""
    if os.environ.get("CXRTOOL_CACHE"):
        return Path(os.environ["CXRTOOL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cxrtool"


def choose(runtime: str, device_type: str) -> str:
    """The runtime a run uses: ``torch`` or ``onnx``.

    Raises:
        UsageError: an unknown name, ONNX asked for on a GPU, or not installed.
    """
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "torch" or (runtime == "auto" and (device_type != "cpu" or not onnx_installed())):
        return "torch"
    if device_type != "cpu":
        raise UsageError("--runtime onnx runs on the CPU; on a GPU use --runtime torch (or auto)")
    if not onnx_installed():
        raise UsageError(ONNX_HINT)
    return "onnx"


@contextlib.contextmanager
def _quiet(logger_name: str):
    """A library's logger held to errors for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export(network: Any, input_size: int, digest: str) -> Path:
    """The network as an ONNX graph (batch size free), exported once per checkpoint digest
    and input size into the cache folder, atomically (runs at the same time agree)."""
    import torch

    from cxrtool.io.outputs import atomic_path

    path = cache_folder() / "onnx" / f"{digest[:16]}-{input_size}px.onnx"
    if path.is_file():
        return path
    network = network.eval().to(memory_format=torch.contiguous_format)
    example = (torch.zeros(2, 1, input_size, input_size),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter reports on stdout, which belongs to --jsonl, and its optimiser logs notes
    # ("Skipping constant folding ...") that mean nothing to a user: keep both quiet.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet("onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(network, example, dynamo=True, dynamic_shapes=({0: batch},),
                                    input_names=["images"], output_names=["logits"])
        with atomic_path(path) as tmp:
            program.save(str(tmp))
    return path


class OnnxNetwork:
    """An exported graph, run by ONNX Runtime with this process's torch thread count.

    Picklable (the path only): each process, a forked worker included, opens its own
    session on first use.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._session = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_session": None}

    def _open(self):
        import onnxruntime
        import torch

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if self._session is None:
            self._session = self._open()
        return self._session.run(None, {"images": np.ascontiguousarray(batch, dtype=np.float32)})[0]
