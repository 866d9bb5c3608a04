"""Classification heads: what turns the backbone's features into one logit per finding.

Every head takes the backbone's spatial feature map (B, C, h, w) and its pooled vector
(B, C) and returns a :class:`ModelOutput`: the logits, which is all ``predict`` and the CAM
methods see, plus what a training loss may need (a pooled embedding, one feature vector per
finding, per-finding spatial attention). A head is one registered class: its name in
``cxrtool.registry.HEADS``, its settings on the model card, its buffers (priors and the
like) in the checkpoint's weights, so :func:`cxrtool.models.build.build_model` rebuilds
any checkpoint from its card alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cxrtool.registry import HEADS


@dataclass
class ModelOutput:
    """What a network's training forward returns (``model(images, full=True)``)."""

    logits: torch.Tensor  # (B, K)
    embedding: torch.Tensor | None = None  # (B, D): the image's pooled embedding
    features: torch.Tensor | None = None  # (B, K, D): one feature vector per finding
    attention: torch.Tensor | None = None  # (B, K, h, w): where each finding's feature looked


class Head(nn.Module):
    """Base class. Subclasses set ``name`` (a key of ``registry.HEADS``), take
    ``(width, findings, **settings)`` and return a :class:`ModelOutput` from ``forward``."""

    name: ClassVar[str] = ""
    # The ModelOutput fields beyond the logits this head fills (loss terms check them).
    gives: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, width: int, findings: Sequence[str]) -> None:
        super().__init__()
        if not findings:
            raise ValueError("a head needs at least one finding")
        self.width = int(width)
        self.findings = tuple(findings)

    def settings(self) -> dict[str, Any]:
        """The constructor's keyword settings, for the model card."""
        return {}

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        raise NotImplementedError

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        """Take a parent's weights (this head's own keys, without the ``head.`` prefix) for
        the findings both have; returns the findings taken. Used by ``train --init``."""
        raise ValueError(f"fine-tuning from a {self.name!r} head is not supported yet")


_HEAD_CLASSES: dict[str, type[Head]] = {}


def register_head(cls: type[Head]) -> type[Head]:
    """Class decorator: make a head buildable by its name (which the registry must list)."""
    if cls.name not in HEADS:
        raise ValueError(f"head {cls.name!r} is not listed in cxrtool.registry.HEADS")
    _HEAD_CLASSES[cls.name] = cls
    return cls


def build_head(name: str, width: int, findings: Sequence[str], settings: Mapping[str, Any] | None = None) -> Head:
    """The head called ``name``, with its settings.

    Raises:
        ValueError: an unknown name (the known ones are listed) or settings it does not take.
    """
    if name not in _HEAD_CLASSES:
        raise ValueError(f"unknown head {name!r}; choose one of {', '.join(HEADS)}")
    try:
        return _HEAD_CLASSES[name](width, findings, **dict(settings or {}))
    except TypeError as error:
        raise ValueError(f"head {name!r}: {error}") from None


@register_head
class LinearHead(Head):
    """One logit per finding from the pooled vector: ``pooled @ weight.T + bias``.

    Its parameters keep ``nn.Linear``'s names (``head.weight``, ``head.bias``), so the
    checkpoints of every earlier cxrtool load unchanged.
    """

    name = "linear"
    gives = frozenset({"embedding"})

    def __init__(self, width: int, findings: Sequence[str]) -> None:
        super().__init__(width, findings)
        reference = nn.Linear(self.width, len(self.findings))  # nn.Linear's initialisation
        self.weight = reference.weight
        self.bias = reference.bias

    def forward(self, feature_map: torch.Tensor, pooled: torch.Tensor) -> ModelOutput:
        return ModelOutput(logits=F.linear(pooled, self.weight, self.bias), embedding=pooled)

    def inherit(self, state: Mapping[str, torch.Tensor], findings: Sequence[str]) -> list[str]:
        taken = []
        with torch.no_grad():
            for row, finding in enumerate(self.findings):
                if finding in findings:
                    source = list(findings).index(finding)
                    self.weight[row] = state["weight"][source]
                    self.bias[row] = state["bias"][source]
                    taken.append(finding)
        return taken


def head_classes() -> dict[str, type[Head]]:
    """Every registered head class by name (a copy)."""
    return dict(_HEAD_CLASSES)
