"""TorchXRayVision's classifiers as cxrtool checkpoints: imported once, safely, exactly.

XRV's DenseNet-121 weight files are pickled whole modules (its ResNet-50 file a state dict).
cxrtool's rule is that checkpoints never unpickle arbitrary objects; :func:`import_xrv`, the
one-time import of a third-party pickle, is the only exception, and a narrow one:

- the file is first read with ``torch.load(weights_only=True)``: a plain state dict (XRV's
  ResNet-50) needs nothing more;
- a file that needs more is unpickled only when it is trusted: its SHA-256 is one of the
  files XRV publishes (:data:`PUBLISHED_SHA256`), or the user says so with ``--trust-pickle``;
- even then, only the names XRV's files need are built (:data:`PICKLE_CALLS`,
  :data:`PICKLE_CLASSES`, by :mod:`._restricted_pickle`); a file that asks for anything else
  (``os.system``, ``subprocess.Popen``, ``builtins.eval``) is refused, trusted or not, with
  the name it asked for, before any of it is unpickled.

It says what it read with its SHA-256, maps the weights into the timm backbone cxrtool uses
everywhere (the key names are the same; the logits are identical), keeps the outputs XRV
trained (a label and an operating point), and writes an ordinary safetensors checkpoint whose
card carries XRV's preprocessing (intensities in [-1024, 1024], centre crop, its skimage
resize), its per-finding operating points (as a calibration) and where the weights came from.
From then on nothing is unpickled: the checkpoint is used like any other.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrtool.errors import UsageError
from cxrtool.models.sources import Importer
from cxrtool.registry import XRV_WEIGHTS, PretrainedWeights

INSTALL_HINT = 'TorchXRayVision is not installed: pip install "cxrtool[xrv]" (or pip install torchxrayvision)'

# The SHA-256 of the weight files XRV publishes (weight set -> digest): a file with one of
# these is unpickled (with only PICKLE_CALLS and PICKLE_CLASSES) without --trust-pickle.
# XRV records no digests (torchxrayvision 1.5.7: only the files' URLs) and none of its files
# has been on a machine where this table was written, so it is empty: a digest goes here
# only when computed from the file downloaded from the URL in xrv.models.model_urls.
PUBLISHED_SHA256: dict[str, str] = {}

# What XRV's pickles may build, from what its files are: a DenseNet pickled whole by
# torch.save (in torch's zip format or its older one, which XRV's 2019-20 files predate the
# change to) holds XRV's four DenseNet classes (unchanged since its first release), torch's
# layers of a DenseNet-121, an OrderedDict of each module's parameters, buffers and children,
# tensors rebuilt from their storages (named by type: torch.FloatStorage for the weights,
# torch.LongStorage for batch norm's counts; torch.load resolves these names to dtypes
# itself), and the set of non-persistent buffer names. The functions may be called by the
# pickle: they build tensors and containers, whatever the arguments. The classes are only
# created empty and given their saved attributes: never called, so XRV's constructor (which
# downloads and unpickles a file) cannot run.
PICKLE_CALLS: tuple[tuple[str, str], ...] = (
    ("torch._utils", "_rebuild_tensor_v2"),  # a tensor on a storage (torch >= 0.4)
    ("torch._utils", "_rebuild_tensor"),  # the same, as torch before 0.4 wrote it
    ("torch._utils", "_rebuild_parameter"),  # a tensor as an nn.Parameter
    ("collections", "OrderedDict"),  # a module's _parameters, _buffers, _modules, hooks
    ("builtins", "set"),  # a module's _non_persistent_buffers_set (Python 2's __builtin__.set)
)
PICKLE_CLASSES: tuple[tuple[str, str], ...] = (
    ("torchxrayvision.models", "DenseNet"),
    ("torchxrayvision.models", "_DenseBlock"),
    ("torchxrayvision.models", "_DenseLayer"),
    ("torchxrayvision.models", "_Transition"),
    ("torch.nn.modules.conv", "Conv2d"),
    ("torch.nn.modules.batchnorm", "BatchNorm2d"),
    ("torch.nn.modules.activation", "ReLU"),
    ("torch.nn.modules.pooling", "MaxPool2d"),
    ("torch.nn.modules.pooling", "AvgPool2d"),
    ("torch.nn.modules.linear", "Linear"),
    ("torch.nn.modules.container", "Sequential"),
    *(("torch", f"{kind}Storage") for kind in ("Float", "Long", "Double", "Half", "BFloat16", "Int", "Short", "Char",
                                             "Byte", "Bool")),
)


@dataclass
class ImportReport:
    """What an import read and wrote."""

    weights: PretrainedWeights
    source_file: Path
    source_sha256: str
    checkpoint: Path
    findings: list[str]
    dropped: list[str]  # XRV outputs that are not findings of the imported model, and why
    unpickled: bool  # the file was a pickled module (DenseNet), not a plain state dict


def xrv_module():
    """TorchXRayVision, imported after torchvision is made importable.

    Raises:
        UsageError: it is not installed (the message says how to get it).
    """
    import cxrtool._compat  # noqa: F401  (its import hook prepares torchvision)

    try:
        import torchxrayvision
    except ImportError as error:
        raise UsageError(f"{INSTALL_HINT} ({error})") from None
    return torchxrayvision


def weight_set(name: str) -> PretrainedWeights:
    """The registry entry of an XRV weight set; ``xrv:`` prefix optional.

    Raises:
        UsageError: an unknown name (the valid ones are listed).
    """
    name = name.removeprefix("xrv:")
    if name not in XRV_WEIGHTS:
        raise UsageError(f"unknown TorchXRayVision weight set {name!r}; choose one of {', '.join(XRV_WEIGHTS)}")
    return XRV_WEIGHTS[name]


def xrv_table(name: str) -> dict[str, Any]:
    """XRV's own record of a weight set: url, labels, operating points, input resolution."""
    xrv = xrv_module()
    return xrv.models.model_urls[weight_set(name).name]


def trained_outputs(labels: list[str], points: list[float]) -> tuple[list[int], list[str]]:
    """The indices of XRV's outputs that are findings (a label and a finite operating
    point), and a note for each output left out."""
    keep, dropped = [], []
    for index, (label, point) in enumerate(zip(labels, points, strict=True)):
        point = float(point)
        if not label:
            continue  # an output this set was never trained on
        if not math.isfinite(point):
            dropped.append(f"{label} (no operating point: not trained in this set)")
            continue
        keep.append(index)
    return keep, dropped


def cached_file(name: str) -> Path:
    """Where XRV keeps (or would download) the set's file."""
    xrv = xrv_module()
    url = xrv.models.model_urls[weight_set(name).name]["weights_url"]
    return Path(os.path.expanduser(xrv.utils.get_cache_dir())) / os.path.basename(url)


def _check_file_name(name: str, path: Path, say: Callable[[str], None]) -> None:
    """XRV's DenseNet sets share one architecture and 18 outputs, so the weights alone cannot
    tell them apart: a file under another set's published name is refused, a renamed one is
    imported with a note (its SHA-256, printed next, is what identifies it)."""
    xrv = xrv_module()
    official = {os.path.basename(xrv.models.model_urls[n]["weights_url"]): n for n in XRV_WEIGHTS}
    expected = os.path.basename(xrv.models.model_urls[weight_set(name).name]["weights_url"])
    if path.name == expected:
        return
    if path.name in official:
        raise UsageError(f"{path}: this is TorchXRayVision's file of xrv:{official[path.name]}, not of xrv:{weight_set(name).name} "
                         f"(whose file is {expected})")
    say(f"note: {path.name} is not TorchXRayVision's name for xrv:{weight_set(name).name} ({expected}); "
        "the sets' DenseNets share one shape, so which set a file holds cannot be told from its weights: "
        "compare its SHA-256 (below) with your download's")


def locate_weights(name: str, weights: str | os.PathLike | None, say: Callable[[str], None]) -> Path:
    """The file to import: the one given, else XRV's cached copy, else XRV downloads it.

    Raises:
        UsageError: a given file that does not exist, or a download that failed (the
            message names the URL, for a machine with network, and ``--weights``).
    """
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"{path}: no such weights file")
        _check_file_name(name, path, say)
        return path
    path = cached_file(name)
    if path.is_file():
        return path
    xrv = xrv_module()
    url = xrv.models.model_urls[weight_set(name).name]["weights_url"]
    say(f"downloading {url} into {path.parent} (TorchXRayVision's cache)")
    try:
        return Path(xrv.models.get_weights(weight_set(name).name))
    except Exception as error:  # noqa: BLE001 - requests, urllib and OS errors alike: say what to do
        raise UsageError(f"could not download {url} ({' '.join(str(error).split())[:200]}); on a machine with network "
                         f"download that file and give it here with --weights FILE") from None


class _Unreadable(UsageError):
    """Not a weights file at all (in XRV's cache: an interrupted download)."""


def _unreadable(path: Path, error: BaseException) -> _Unreadable:
    reason = " ".join(str(error).split()).split(". ")[0][:160] or type(error).__name__
    return _Unreadable(f"{path}: not a readable PyTorch weights file, cut short or corrupt? ({reason})")


def _read_state(path: Path, *, trusted: bool) -> tuple[dict[str, Any], bool]:
    """The weights in an XRV file, and whether it was unpickled beyond ``weights_only``.

    A plain state dict is read by ``torch.load(weights_only=True)``. Anything more (XRV's
    DenseNet files are pickled modules) is unpickled only when ``trusted`` (a published
    SHA-256, or --trust-pickle), and then only with :data:`PICKLE_CALLS` and
    :data:`PICKLE_CLASSES`: the one exception to "checkpoints never unpickle arbitrary objects".

    Raises:
        UsageError: not a weights file; a pickle that asks for something else (named,
            trusted or not); an untrusted pickle (the message says how to trust it).
    """
    import torch

    from cxrtool.models.sources._restricted_pickle import RefusedGlobal, globals_asked, reader

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the safe loader refuses a module, or chokes on a corrupt file, in many ways
        safe_error = error  # not a plain state dict: a pickled module, or not a weights file at all (below)
    else:
        if isinstance(state, dict):
            return dict(state), False
        raise UsageError(f"{path}: holds a {type(state).__name__}, not TorchXRayVision's weights (a model or a state dict)")
    asked = globals_asked(path)  # read from the opcodes: nothing is unpickled
    if asked is None:
        raise _unreadable(path, safe_error)
    admitted = set(PICKLE_CALLS) | set(PICKLE_CLASSES)
    for module, name in asked:
        if (module, name) not in admitted:
            raise UsageError(f"{path}: refused: {RefusedGlobal(f'{module}.{name}')}")
    if not trusted:
        raise UsageError(f"{path}: a pickled Python module whose SHA-256 is not one of TorchXRayVision's published files "
                         "that cxrtool knows, and unpickling a file can run code: if you made it or trust where it came "
                         "from, import it with --trust-pickle")
    try:
        module = torch.load(path, map_location="cpu", weights_only=False,
                            pickle_module=reader(calls=PICKLE_CALLS, classes=PICKLE_CLASSES))
    except RefusedGlobal as error:
        raise UsageError(f"{path}: refused: {error}") from None
    except Exception as error:  # noqa: BLE001 - a corrupt pickle raises anything (KeyError, EOFError, ...)
        raise _unreadable(path, error) from None
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"{path}: holds a {type(module).__name__}, not TorchXRayVision's weights (a model or a state dict)")
    for sub in module.modules():  # XRV's own patch for modules pickled by an older torch
        if not hasattr(sub, "_non_persistent_buffers_set"):
            sub._non_persistent_buffers_set = set()
    return dict(module.state_dict()), True


def to_cxrtool_state(state: dict[str, Any], architecture: str, keep: list[int]) -> dict[str, Any]:
    """XRV's state dict in cxrtool's layout: ``backbone.*`` (timm's key names, which XRV's
    share) and ``head.*`` (the classifier's rows of the kept outputs)."""
    head_prefix = "classifier." if architecture == "densenet121" else "fc."
    mapped: dict[str, Any] = {}
    for key, value in state.items():
        if key == "op_threshs":
            continue  # a buffer of XRV's module; the points go into the card's calibration
        if key.startswith(head_prefix):
            mapped["head." + key[len(head_prefix):]] = value[keep]
        else:
            mapped["backbone." + key] = value
    return mapped


def import_xrv(
    name: str,
    out: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    model_name: str | None = None,
    trust_pickle: bool = False,
    say: Callable[[str], None] = print,
) -> ImportReport:
    """Import a TorchXRayVision classifier into a cxrtool checkpoint.

    Args:
        name: the weight set, e.g. ``densenet121-res224-all`` (``xrv:`` prefix optional).
        out: the checkpoint to write (``.safetensors``).
        weights: the set's file, when downloaded elsewhere; default: XRV's cache, else XRV
            downloads it (needs the network).
        model_name: the card's name (default ``xrv-<set>``).
        trust_pickle: unpickle a file that is a pickled module although its SHA-256 is
            not one of XRV's published files (one you made, or trust): it may then run
            code on import, but only through the names XRV's files need
            (:data:`PICKLE_CALLS`, :data:`PICKLE_CLASSES`); anything else is refused.
        say: where the notes go (what is unpickled, its SHA-256, a download).

    Raises:
        UsageError: XRV not installed, an unknown set, a missing file or failed download,
            a pickle that is not trusted or asks for more than weights need, or a file whose
            weights do not fit the set's architecture.

    Example:
        >>> report = import_xrv("densenet121-res224-all", "xrv-all.safetensors")
        >>> report.findings[:3]
        ['Atelectasis', 'Consolidation', 'Infiltration']
    """
    from cxrtool.io.records import sha256_file
    from cxrtool.models.calibration import operating_point_card
    from cxrtool.models.checkpoint import ModelCard, save_checkpoint
    from cxrtool.models.network import CXRClassifier
    from cxrtool.preprocess import xrv_preprocessing

    entry = weight_set(name)
    xrv = xrv_module()
    table = xrv.models.model_urls[entry.name]
    path = locate_weights(entry.name, weights, say)
    digest = sha256_file(path)
    say(f"reading {path} (SHA-256 {digest})")
    published = digest in PUBLISHED_SHA256.values()
    try:
        state, unpickled = _read_state(path, trusted=published or trust_pickle)
    except _Unreadable as error:
        if weights is None:  # XRV's cache: an interrupted download leaves a partial file there
            raise UsageError(f"{error}; delete it to download it again") from None
        raise
    if unpickled:
        why = "its SHA-256 is TorchXRayVision's published file's" if published else "--trust-pickle"
        say(f"  it is a pickled Python module (as TorchXRayVision publishes its DenseNet weights): unpickled here ({why}), "
            "with only the classes a weights file needs, the one place cxrtool unpickles anything")
    labels, points = list(table["labels"]), [float(p) for p in table["op_threshs"]]
    keep, dropped = trained_outputs(labels, points)
    findings = [labels[i] for i in keep]
    model = CXRClassifier(entry.architecture, findings)
    try:
        model.load_state_dict(to_cxrtool_state(state, entry.architecture, keep), strict=True)
    except (RuntimeError, IndexError) as error:
        first = str(error).splitlines()[0]
        raise UsageError(f"{path}: these are not {entry.name} weights ({first})") from None
    input_size = int(table.get("input_resolution", entry.input_size))
    card = ModelCard(
        architecture=entry.architecture,
        findings=findings,
        preprocessing=xrv_preprocessing(input_size).to_dict(),
        name=model_name or f"xrv-{entry.name}",
        thresholds=dict.fromkeys(findings, 0.5),
        threshold_method="operating points (TorchXRayVision)",
        calibration=operating_point_card(findings, [points[i] for i in keep]),
        training={"trained_on": entry.trained_on, "by": "TorchXRayVision (Cohen et al., MIDL 2022)"},
        source={
            "library": "torchxrayvision",
            "library_version": getattr(xrv, "__version__", ""),
            "weights": entry.name,
            "file": path.name,
            "url": table.get("weights_url", ""),
            "sha256": digest,
            "licence": entry.licence,
            "unpickled": unpickled,
            "outputs_left_out": dropped,
        },
    )
    checkpoint = save_checkpoint(out, model, card)
    return ImportReport(entry, path, digest, Path(checkpoint), findings, dropped, unpickled)


def available_sets() -> tuple[list[dict[str, str]], str | None]:
    """The importable weight sets, one row each, their findings from TorchXRayVision itself
    when it is installed; and, when it is not, the note that says so."""
    rows, missing = [], None
    for entry in XRV_WEIGHTS.values():
        try:
            record = xrv_table(entry.name)
            keep, _ = trained_outputs(list(record["labels"]), [float(p) for p in record["op_threshs"]])
            findings = ", ".join(record["labels"][i] for i in keep)
        except UsageError as error:
            missing, findings = str(error).split(" (")[0], "(install TorchXRayVision to list them)"
        rows.append({"name": f"xrv:{entry.name}", "architecture": entry.architecture, "input": f"{entry.input_size} px",
                     "trained on": entry.trained_on, "findings": findings})
    return rows, missing


IMPORTER = Importer(prefix="xrv", library="TorchXRayVision", available=available_sets, run=import_xrv)
