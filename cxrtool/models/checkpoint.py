"""Self-describing checkpoints: weights in safetensors, the model card in its metadata.

A checkpoint is one ``.safetensors`` file. Its header metadata holds the card (findings in
order, architecture, preprocessing, thresholds, training data and metrics, cxrtool
version) as JSON, so ``predict`` needs no flag to repeat how a model was trained, and
loading never unpickles anything.

Training state for ``--resume`` uses the same format through :func:`save_tree` /
:func:`load_tree`: tensors of a nested dict go to safetensors, every other leaf to JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cxrtool.io.outputs import atomic_path
from cxrtool.io.records.provenance import sha256_file as file_sha256  # noqa: F401  (the one definition, by its name here)
from cxrtool.models.card import CARD_KEY, FORMAT, FORMAT_VERSION, TREE_KEY, CheckpointError, ModelCard  # noqa: F401

TRAINING_PREFIX = "training."  # tensors kept beside the weights that predicting does not use


def save_checkpoint(path: str | os.PathLike, model, card: ModelCard, *, training: Mapping[str, Any] | None = None) -> Path:
    """Write the model's weights and card to one safetensors file, atomically.

    ``training``: tensors of the training that made it (a loss term's prototypes) to keep
    beside the weights, under ``training.``; loading the model ignores them
    (:func:`read_training_tensors` reads them back).
    """
    from safetensors.torch import save_file

    from cxrtool import __version__

    path = Path(path)
    card.cxrtool_version = card.cxrtool_version or __version__
    card.created = card.created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    module = getattr(model, "module", model)  # unwrap DistributedDataParallel
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({TRAINING_PREFIX + k: v.detach().cpu().contiguous() for k, v in (training or {}).items()})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={CARD_KEY: card.to_json()})
    return path


def read_card(path: str | os.PathLike) -> ModelCard:
    """Read only the card of a checkpoint (fast: the header, not the weights)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a safetensors file ({error})") from error
    if CARD_KEY not in metadata:
        raise CheckpointError(f"{path}: safetensors file without a cxrtool model card")
    return ModelCard.from_json(metadata[CARD_KEY], source=str(path))


def load_checkpoint(path: str | os.PathLike, *, device: str = "cpu"):
    """Rebuild the network from a checkpoint; returns ``(model, card)`` in eval mode.

    Example:
        >>> model, card = load_checkpoint("demo.safetensors")
        >>> card.findings[:2]
        ['Atelectasis', 'Cardiomegaly']
    """
    from safetensors.torch import load_file

    from cxrtool.models.build import build_model

    card = read_card(path)
    if card.calibration:
        from cxrtool.models.calibration import Calibration

        try:
            Calibration.from_card(card)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{path}: the card's calibration cannot be used ({error})") from None
    model = build_model(card, source=str(path))
    state = {k: v for k, v in load_file(str(path), device="cpu").items() if not k.startswith(TRAINING_PREFIX)}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CheckpointError(f"{path}: weights do not match the card's architecture ({first})") from error
    return model.to(device).eval(), card


def read_training_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors a checkpoint keeps of its training (e.g. ``loss.terms.0.prototypes``)."""
    from safetensors.torch import load_file

    return {k[len(TRAINING_PREFIX):]: v for k, v in load_file(str(path), device="cpu").items() if k.startswith(TRAINING_PREFIX)}


# ---- nested state (training resume) -------------------------------------------------


def save_tree(path: str | os.PathLike, tree: Mapping[str, Any]) -> Path:
    """Save a nested dict of tensors and plain values (no pickling), atomically."""
    import torch
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = prefix or "_"
            tensors[key] = node.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(node, Mapping):
            if not all(isinstance(k, (str, int)) for k in node):
                raise TypeError(f"cannot save keys of types {[type(k).__name__ for k in node]}")
            # int keys (optimizer state) survive through the tagged form.
            return {
                "__dict__": [[k, strip(v, f"{prefix}/{k}")] for k, v in node.items()],
            }
        if isinstance(node, (list, tuple)):
            return {"__list__": [strip(v, f"{prefix}/{i}") for i, v in enumerate(node)], "tuple": isinstance(node, tuple)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot save a {type(node).__name__} at {prefix or '/'}")

    structure = strip(tree, "")
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={TREE_KEY: json.dumps(structure)})
    return path


def load_tree(path: str | os.PathLike) -> dict[str, Any]:
    """Load what :func:`save_tree` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if TREE_KEY not in metadata:
            raise CheckpointError(f"{path}: not a cxrtool training state")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}

    def build(node: Any) -> Any:
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__dict__" in node:
                return {k: build(v) for k, v in node["__dict__"]}
            if "__list__" in node:
                items = [build(v) for v in node["__list__"]]
                return tuple(items) if node.get("tuple") else items
        return node

    return build(json.loads(metadata[TREE_KEY]))
