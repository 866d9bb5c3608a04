"""The one factory from a model card to a network: every command that loads a checkpoint
goes through :func:`build_model`, so a new head is one registered class, not edits in the
loaders."""

from __future__ import annotations

from cxrtool.models.card import CheckpointError, ModelCard
from cxrtool.registry import HEADS


def build_model(card: ModelCard, *, source: str = "checkpoint"):
    """The untrained network the card describes (backbone, head and its settings; buffers
    such as priors have their shapes, filled when the weights are loaded).

    Raises:
        CheckpointError: a head this cxrtool does not know, or settings it cannot build.
    """
    from cxrtool.models.network import CXRClassifier

    if card.head not in HEADS:
        raise CheckpointError(f"{source}: head {card.head!r} is not known to this cxrtool version "
                              f"(it knows {', '.join(HEADS)}); upgrade cxrtool")
    try:
        return CXRClassifier(card.architecture, card.findings, output_stride=card.output_stride, head=card.head,
                             head_settings=card.head_settings, text_dim=int((card.text or {}).get("dim", 0)),
                             padding=card.padding)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: cannot build the card's network: {error}") from error
