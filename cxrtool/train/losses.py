"""Training losses: registered terms, combined with weights by a loss expression.

A loss expression names terms from ``cxrtool.registry.LOSSES`` with optional weights:
``asl``, ``0.5*bce+focal``, ``asl+0.2*apcl``. Each term receives the network's whole
:class:`~cxrtool.models.heads.ModelOutput` (logits, and per-finding features or an
embedding where the head gives them) and the batch (a dict: ``image``, ``targets``,
``index``, and whatever a term asks the dataset for), so a term that needs more than logits
is one more class, not an edit of the loop.

The classification terms mask unknown labels (NaN targets: CheXpert's uncertain ones under
``--uncertain ignore``). Asymmetric loss follows Ridnik et al., "Asymmetric Loss For
Multi-Label Classification" (ICCV 2021): a stronger focusing on negatives plus probability
shifting, which suits the long tail of chest findings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrtool.models.heads import ModelOutput
from cxrtool.registry import LOSSES


class MaskedMultiLabelLoss(nn.Module):
    """Base class: subclasses give the element-wise loss; masking and averaging live here."""

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        safe_targets = torch.where(known, targets, torch.zeros_like(targets))
        losses = self.elementwise(logits.float(), safe_targets.float()) * known
        return losses.sum() / known.sum().clamp(min=1)


class BCELoss(MaskedMultiLabelLoss):
    def __init__(self, pos_weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight if pos_weight is not None else None, persistent=False)

    def elementwise(self, logits, targets):
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.pos_weight, reduction="none")


class FocalLoss(MaskedMultiLabelLoss):
    """Lin et al. (2017): down-weights easy examples by (1 - p_t)^gamma."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def elementwise(self, logits, targets):
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        return (1 - p_t).pow(self.gamma) * bce


class AsymmetricLoss(MaskedMultiLabelLoss):
    """ASL: gamma_neg > gamma_pos focuses on hard negatives; ``clip`` shifts negative
    probabilities down so that very easy negatives contribute nothing."""

    def __init__(self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8):
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def elementwise(self, logits, targets):
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = targets * torch.log(p.clamp(min=self.eps)) * (1 - p).pow(self.gamma_pos)
        loss_neg = (1 - targets) * torch.log((1 - p_neg).clamp(min=self.eps)) * p_neg.pow(self.gamma_neg)
        return -(loss_pos + loss_neg)


# ---- terms -------------------------------------------------------------------------------


@dataclass
class LossContext:
    """What a term may be built from: the training labels and the run's settings."""

    findings: Sequence[str]
    targets: np.ndarray | None = None  # (N, K) training targets, NaN unknown
    settings: Mapping[str, Any] = field(default_factory=dict)  # the training configuration's values

    def setting(self, name: str, default: Any) -> Any:
        return self.settings.get(name, default)


class LossTerm(nn.Module):
    """One term of a loss expression. ``needs`` names the :class:`ModelOutput` fields it
    uses beyond the logits, so a head that lacks them is refused before training starts."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    # Batch entries beyond image/targets/index the dataset must give (e.g. "image_2").
    batch_needs: ClassVar[frozenset[str]] = frozenset()

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class ClassificationTerm(LossTerm):
    """A masked multi-label loss on the logits against ``batch["targets"]``."""

    def __init__(self, name: str, loss: MaskedMultiLabelLoss) -> None:
        super().__init__()
        self.name = name
        self.loss = loss

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.loss(output.logits.float(), batch["targets"])


def _weighted_bce(context: LossContext) -> ClassificationTerm:
    if context.targets is None:
        raise ValueError("weighted_bce needs the training targets to count positives")
    t = torch.as_tensor(context.targets, dtype=torch.float32)
    known = ~torch.isnan(t)
    positives = torch.nan_to_num(t, nan=0.0).sum(0)
    negatives = known.sum(0) - positives
    return ClassificationTerm("weighted_bce", BCELoss(pos_weight=(negatives / positives.clamp(min=1)).clamp(max=100.0)))


_TERM_BUILDERS: dict[str, Callable[[LossContext], LossTerm]] = {
    "bce": lambda context: ClassificationTerm("bce", BCELoss()),
    "weighted_bce": _weighted_bce,
    "focal": lambda context: ClassificationTerm("focal", FocalLoss(context.setting("focal_gamma", 2.0))),
    "asl": lambda context: ClassificationTerm("asl", AsymmetricLoss(context.setting("asl_gamma_neg", 4.0),
                                                                    context.setting("asl_gamma_pos", 0.0),
                                                                    context.setting("asl_clip", 0.05))),
}
assert set(_TERM_BUILDERS) == set(LOSSES), "every loss term in the registry has a builder, and no other"


# ---- expressions -------------------------------------------------------------------------

_TERM = re.compile(r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*$")


def parse_loss(expression: str) -> list[tuple[float, str]]:
    """``"asl+0.2*apcl"`` -> ``[(1.0, "asl"), (0.2, "apcl")]``.

    Raises:
        ValueError: an expression that does not parse, an unknown term (the known ones are
            listed), a term named twice, or a weight that is not a positive finite number.
    """
    choices = ", ".join(LOSSES)
    if not expression or not expression.strip():
        raise ValueError(f"empty loss expression; name terms from {choices}, e.g. asl or asl+0.2*bce")
    terms: list[tuple[float, str]] = []
    for part in expression.split("+"):
        match = _TERM.match(part)
        if match is None:
            raise ValueError(f"cannot read the loss expression {expression!r} at {part.strip()!r}: "
                             f"write terms as NAME or WEIGHT*NAME joined by +, e.g. asl+0.2*bce")
        name = match["name"]
        if name not in LOSSES:
            raise ValueError(f"unknown loss term {name!r} in {expression!r}; choose from {choices}")
        weight = float(match["weight"]) if match["weight"] is not None else 1.0
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"loss term {name!r} has weight {weight}; weights are positive numbers")
        if any(name == seen for _, seen in terms):
            raise ValueError(f"loss term {name!r} appears twice in {expression!r}")
        terms.append((weight, name))
    return terms


class CombinedLoss(nn.Module):
    """The weighted sum of a loss expression's terms; also returns each term's value."""

    def __init__(self, terms: Sequence[tuple[float, LossTerm]]) -> None:
        super().__init__()
        self.weights = [float(weight) for weight, _ in terms]
        self.terms = nn.ModuleList([term for _, term in terms])

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(term.needs for term in self.terms))

    @property
    def batch_needs(self) -> frozenset[str]:
        return frozenset().union(*(term.batch_needs for term in self.terms))

    @property
    def expression(self) -> str:
        return "+".join(term.name if weight == 1 else f"{weight:g}*{term.name}"
                        for weight, term in zip(self.weights, self.terms, strict=True))

    def forward(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        total, parts = None, {}
        for weight, term in zip(self.weights, self.terms, strict=True):
            value = term(output, batch)
            parts[term.name] = float(value.detach())
            total = weight * value if total is None else total + weight * value
        return total, parts


def build_loss(expression: str, context: LossContext) -> CombinedLoss:
    """The loss an expression names, each term built from the context.

    Example:
        >>> loss = build_loss("asl+0.5*bce", LossContext(findings=["Effusion"]))
        >>> total, parts = loss(ModelOutput(logits=torch.zeros(2, 1)), {"targets": torch.ones(2, 1)})
    """
    return CombinedLoss([(weight, _TERM_BUILDERS[name](context)) for weight, name in parse_loss(expression)])


def check_head_gives(loss: CombinedLoss, head_name: str, gives: frozenset[str]) -> None:
    """Refuse a loss whose terms need outputs the head does not give.

    Raises:
        ValueError: naming the term and what it needs.
    """
    for term in loss.terms:
        missing = term.needs - gives
        if missing:
            raise ValueError(f"loss term {term.name!r} needs the head's {', '.join(sorted(missing))}, "
                             f"which the {head_name!r} head does not give")
