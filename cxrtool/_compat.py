"""Make torchvision importable on CPU-only machines that carry its CUDA build, whatever the
import order.

The only torchvision that pairs with the CPU torch wheel used here is a CUDA build. Its
compiled ops cannot load next to CPU torch, and ``import torchvision`` (which timm and
grad-cam need) then fails in ``_meta_registrations`` with "operator torchvision::nms does
not exist", because it registers fake kernels for ops that were never defined.

``ensure_torchvision_importable`` defines those op names (schemas only, no kernels) when,
and only when, torchvision's own library cannot be loaded. On a normal install (CPU torch
with CPU torchvision, or CUDA with CUDA) the library loads and nothing is touched.

``install_import_hook`` (run by ``import cxrtool``) makes that happen on the first
``import torchvision`` of the process, whoever imports it (timm, grad-cam,
torchxrayvision, the user), without importing torch before it is needed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# The ops that torchvision's import-time fake registrations require to exist.
_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_fallback_library = None  # kept alive: definitions vanish with the Library object
_checked = False


def ensure_torchvision_importable() -> bool:
    """Prepare ``import torchvision``; return True if op names had to be stubbed.

    Safe to call many times and before or after torch is imported. Detection operators
    (nms, roi_align) stay unavailable in the stubbed case; cxrtool never uses them.
    """
    global _fallback_library, _checked
    if _checked or "torchvision" in sys.modules:
        return _fallback_library is not None
    _checked = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False

    import torch

    if _op_exists(torch, "nms"):
        return False
    compiled = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(
        Path(spec.origin).parent.glob("_C*.pyd")
    )
    for library_path in compiled:
        try:
            torch.ops.load_library(str(library_path))
        except (OSError, RuntimeError):
            continue  # e.g. a CUDA build next to CPU torch: undefined symbols
        if _op_exists(torch, "nms"):
            return False

    _fallback_library = torch.library.Library("torchvision", "FRAGMENT")
    for name, schema in _OP_SCHEMAS.items():
        if not _op_exists(torch, name):
            _fallback_library.define(schema)
    return True


class _TorchvisionFirst:
    """A meta path finder that prepares torchvision before its first import, then steps
    aside (returns None: the normal finders import it)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" and not _checked:
            ensure_torchvision_importable()
        return None


_HOOK = _TorchvisionFirst()


def install_import_hook() -> None:
    """Prepare torchvision on its first import in this process, whoever imports it."""
    if "torchvision" in sys.modules or _HOOK in sys.meta_path:
        return
    sys.meta_path.insert(0, _HOOK)


def _op_exists(torch, name: str) -> bool:
    return torch._C._dispatch_has_kernel(f"torchvision::{name}") or _schema_exists(torch, name)


def _schema_exists(torch, name: str) -> bool:
    try:
        torch._C._get_schema(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True
