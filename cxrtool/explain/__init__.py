"""Where the evidence is: class activation maps (through the grad-cam package) turned into
overlays, masks and boxes. ``explain`` is the Python API behind ``cxrtool explain``.

Importing this package is light; the CAM machinery (torch, pytorch-grad-cam) loads on use.
"""

from cxrtool.explain.run import ExplainSettings, explain, file_slug
from cxrtool.registry import CAM_METHOD_LABELS

CAM_METHOD_NAMES = tuple(CAM_METHOD_LABELS)

__all__ = ["CAM_METHOD_NAMES", "ExplainSettings", "explain", "file_slug"]
