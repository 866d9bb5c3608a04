"""Multi-label losses with a mask for ignored labels (NaN targets).

Asymmetric loss follows Ridnik et al., "Asymmetric Loss For Multi-Label Classification"
(ICCV 2021): a stronger focusing on negatives plus probability shifting, which suits the
long tail of chest findings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


def build_loss(name: str, *, targets=None, focal_gamma=2.0, asl_gamma_neg=4.0, asl_gamma_pos=0.0, asl_clip=0.05):
    """The loss by name; ``weighted_bce`` takes pos_weight = negatives / positives per finding
    from the training targets (NaN ignored)."""
    if name == "bce":
        return BCELoss()
    if name == "weighted_bce":
        if targets is None:
            raise ValueError("weighted_bce needs the training targets to count positives")
        t = torch.as_tensor(targets, dtype=torch.float32)
        known = ~torch.isnan(t)
        positives = torch.nan_to_num(t, nan=0.0).sum(0)
        negatives = known.sum(0) - positives
        return BCELoss(pos_weight=(negatives / positives.clamp(min=1)).clamp(max=100.0))
    if name == "focal":
        return FocalLoss(focal_gamma)
    if name == "asl":
        return AsymmetricLoss(asl_gamma_neg, asl_gamma_pos, asl_clip)
    from cxrtool.registry import LOSSES

    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
