"""Where models come from: two registries, each entry one module.

- **Model sources**: what ``predict``, ``explain``, ``evaluate`` and ``models calibrate``
  open directly. Each module in :data:`SOURCE_MODULES` defines ``SOURCE``, a
  :class:`ModelSource`: how it recognises a model argument, reads its identity without
  loading weights, and opens it into a :class:`~cxrtool.models.scoring.Scorer`. Today:
  bundles (:mod:`.bundle`) and cxrtool checkpoints (:mod:`.checkpoint`, the fallback,
  last). To the study runner every source is the same kind of thing.
- **Importers**: other libraries' weight sets, imported once into ordinary cxrtool
  checkpoints (``cxrtool models import PREFIX:NAME``). Each module in
  :data:`IMPORTER_MODULES` defines ``IMPORTER``, an :class:`Importer`. Today:
  TorchXRayVision (:mod:`.xrv`, the one place anything is unpickled).

Adding a source or an importer is one new module here and its name in the tuple; see
"Extending cxrtool" in the README.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# In the order they are asked; the first whose ``matches`` is true opens the model.
SOURCE_MODULES: tuple[str, ...] = ("cxrtool.models.sources.bundle", "cxrtool.models.sources.checkpoint")
IMPORTER_MODULES: tuple[str, ...] = ("cxrtool.models.sources.xrv",)


@dataclass(frozen=True)
class ModelSource:
    """A kind of model file.

    Attributes:
        name: what it is called in messages.
        description: one line for the user.
        matches: whether a model argument (a path, or an object already read) is of this kind.
        identify: model -> (the SHA-256 its results carry, finding -> threshold), without
            loading any weights.
        open: model -> a :class:`~cxrtool.models.scoring.Scorer`, with the keyword
            arguments ``device``, ``runtime``, ``note``, ``tta`` and ``zero_shot``.
    """

    name: str
    description: str
    matches: Callable[[Any], bool]
    identify: Callable[[Any], tuple[str, dict[str, float]]]
    open: Callable[..., Any]


@dataclass(frozen=True)
class Importer:
    """Another library's weight sets, imported once into cxrtool checkpoints.

    Attributes:
        prefix: how the user names a set: ``PREFIX:NAME``.
        library: the library's name, for messages.
        available: () -> one row per importable set (``name``, ``architecture``,
            ``input``, ``trained on``, ``findings``), and a note to show under them or None.
        run: (set name, out path, *, weights, model_name, trust_pickle, say) -> a report
            with ``checkpoint`` (the file written), ``weights`` (its ``architecture`` and
            ``input_size``), ``findings`` and ``dropped`` (outputs left out).
            ``trust_pickle``: the user allows a pickle whose digest is not a published
            file's (still only with the classes weights need); an importer that reads no
            pickles ignores it.
    """

    prefix: str
    library: str
    available: Callable[[], tuple[list[dict[str, str]], str | None]]
    run: Callable[..., Any]


def sources() -> list[ModelSource]:
    """The model sources, in the order they are asked."""
    return [importlib.import_module(name).SOURCE for name in SOURCE_MODULES]


def importers() -> dict[str, Importer]:
    """The importers by prefix."""
    found = [importlib.import_module(name).IMPORTER for name in IMPORTER_MODULES]
    return {importer.prefix: importer for importer in found}


def source_for(model: str | os.PathLike | Any) -> ModelSource:
    """The source that claims ``model``.

    Raises:
        ValueError: none does (an argument that is neither a path nor a read model).
    """
    for source in sources():
        if source.matches(model):
            return source
    raise ValueError(f"not a model: {model!r}")


def open_model(model: str | os.PathLike | Any, *, device, runtime: str = "torch", note: Callable[[str], None] | None = None,
               tta: Any = None, zero_shot: Any = None) -> Any:
    """``model`` (a checkpoint, a bundle: a file, or one already read) loaded onto ``device``
    and ready to score, by the source that claims it (with ``tta``, a
    :class:`~cxrtool.preprocess.TestTimeAugmentation`, and ``zero_shot``, a
    :class:`~cxrtool.models.scoring.ZeroShot`).

    Raises:
        CheckpointError: a file that is not a usable model (a bad bundle's
            :class:`~cxrtool.models.sources.bundle.BundleError` names the fix).
    """
    from cxrtool.preprocess import NO_TTA

    return source_for(model).open(model, device=device, runtime=runtime, note=note, tta=tta or NO_TTA, zero_shot=zero_shot)


def identify(model: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """A model's identity (the SHA-256 its results carry) and its decision thresholds,
    read without loading any weights."""
    return source_for(model).identify(model)


__all__ = ["IMPORTER_MODULES", "SOURCE_MODULES", "Importer", "ModelSource", "identify", "importers", "open_model",
           "source_for", "sources"]
